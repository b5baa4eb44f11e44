"""The hook contexts: documented once (on the dataclasses), the guide generated from them, and the main-process answer.

``docs/hooks.md`` is generated from ``wakelab.hooks.context`` and ``wakelab.hooks.specs``; the test here fails when it
is out of date (``make docs``). Every context says whether this process is the one that writes (``is_main_process``), so
no plugin reads ``RANK`` itself.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import loaded_plugin, tiny_overrides

import wakelab
from wakelab.cli.main import main
from wakelab.config import build_config
from wakelab.hooks.context import CONTEXTS, StepState
from wakelab.hooks.docs import hook_names, reference_markdown
from wakelab.run import engine

ROOT = Path(__file__).resolve().parents[1]


def test_hooks_reference_is_current():
    committed = (ROOT / "docs" / "hooks.md").read_text()
    assert committed == reference_markdown(), "run `make docs` to regenerate docs/hooks.md"


def test_contexts_markdown_command_prints_the_reference():
    result = CliRunner().invoke(main, ["plugins", "--contexts-markdown"])
    assert result.exit_code == 0, result.output
    assert result.output == reference_markdown()


def test_every_context_field_is_documented_and_in_the_reference():
    reference = reference_markdown()
    for cls in CONTEXTS:
        assert getattr(wakelab, cls.__name__) is cls  # the public names are these classes
        for field in dataclasses.fields(cls):
            doc = field.metadata.get("doc", "")
            assert len(doc) > 10, f"{cls.__name__}.{field.name} has no doc"
            assert f"{field.name}: {doc}" in cls.__doc__  # help(wakelab.StepState) shows it
            assert f"| `{field.name}` |" in reference
    for name in hook_names():
        assert f"### `{name}(" in reference
    assert "### `init_embeddings(ctx)` (first answer wins)" in reference


def test_hookspecs_refer_to_the_contexts_instead_of_listing_fields():
    import inspect

    from wakelab.hooks import specs as hookspecs

    for name in hook_names():
        function = getattr(hookspecs, name)
        arguments = set(inspect.signature(function).parameters)
        listed = [
            f
            for cls in CONTEXTS
            for f in dataclasses.fields(cls)
            if f"``{f.name}``" in function.__doc__ and f.name not in arguments
        ]
        assert not listed, f"hookspecs.{name} re-lists context fields {[f.name for f in listed]}; link the type"


def test_main_process_defaults_to_the_rank(monkeypatch):
    fields = dict(step=1, loss=0.0, lr=0.0, logits=None, model=torch.nn.Linear(1, 1), optimizer=None, rows=None)
    monkeypatch.delenv("RANK", raising=False)
    assert StepState(**fields).is_main_process is True
    monkeypatch.setenv("RANK", "1")
    assert StepState(**fields).is_main_process is False
    assert StepState(**fields, is_main_process=True).is_main_process is True


def test_every_hook_context_says_main_process_in_a_single_process(tiny_model, texts, tmp_path):
    plugin = tmp_path / "who_speaks.py"
    plugin.write_text(
        textwrap.dedent("""
        import wakelab
        SEEN = {}

        def note(kind, ctx):
            SEEN.setdefault(kind, set()).add(ctx.is_main_process)

        @wakelab.hookimpl(tryfirst=True)
        def init_embeddings(ctx):
            note("init", ctx)  # asked first, answers None: spherical fills the rows

        @wakelab.hookimpl
        def check_inputs(ctx):
            note("inputs", ctx)
            assert ctx.model_config.num_hidden_layers == 2 and len(ctx.new_ids) == len(ctx.new_words) > 0
            assert len(ctx.corpus_ids) > 0 and ctx.corpus_ids.max() >= ctx.num_base

        @wakelab.hookimpl
        def mask_grads(ctx):
            note("grad", ctx)

        @wakelab.hookimpl
        def on_step_end(state):
            note("step", state)

        @wakelab.hookimpl
        def on_save(ctx):
            note("save", ctx)

        @wakelab.hookimpl
        def on_run_start(run):
            note("run", run)
    """)
    )
    overrides = tiny_overrides(tiny_model, texts, **{"train.max_steps": 2, "train.save_steps": 2})
    overrides["plugins"] = [str(plugin)]
    engine.run(build_config(None, None, overrides), progress=False)
    assert loaded_plugin(plugin).SEEN == {kind: {True} for kind in ("inputs", "init", "grad", "step", "save", "run")}


def test_recorder_records_nothing_outside_the_main_process(tmp_path):
    from wakelab.plugins import recorder

    plugin = recorder.Plugin()
    plugin.recorder = object()  # whatever an earlier run left
    run = wakelab.RunContext(
        config=None,
        output_dir=tmp_path / "run",
        run_id=None,
        model=None,
        tokenizer=None,
        rows=None,
        is_main_process=False,
    )
    plugin.on_run_start(run)
    assert plugin.recorder is None
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("plugin", ["plugins/top_movers.py", "examples/wakelab-norm-watch/wakelab_norm_watch.py"])
def test_example_plugins_ask_the_context_not_the_environment(plugin):
    text = (ROOT / plugin).read_text()
    assert "is_main_process" in text and "RANK" not in text
