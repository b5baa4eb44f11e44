"""Every hook is tested through the public mechanism: a throw-away plugin file activated by path.

``test_every_hook_has_a_test`` fails when a hook is added to hookspecs.py without a ``test_hook_<name>`` here.
"""

from __future__ import annotations

import json
import textwrap

import mlflow
import pytest
import torch
from click.testing import CliRunner
from conftest import loaded_plugin, tiny_overrides

from wakelab.cli.main import main
from wakelab.config import build_config
from wakelab.errors import ConfigError, PluginError
from wakelab.hooks import registry
from wakelab.run import engine


def plugin_file(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text("import wakelab\nimport torch\nSEEN = []\n" + textwrap.dedent(body))
    return path


def run_with(tmp_path, tiny_model, texts, plugin, **extra):
    overrides = tiny_overrides(tiny_model, texts, **extra)
    overrides["plugins"] = [str(plugin)]
    result = engine.run(build_config(None, None, overrides), progress=False)
    return result, loaded_plugin(plugin)


def test_every_hook_has_a_test():
    missing = [name for name in registry.hook_names() if f"test_hook_{name}" not in globals()]
    assert not missing, f"hooks without a test: {missing}"


def test_hook_init_embeddings(tiny_model, texts, tmp_path):
    plugin = plugin_file(
        tmp_path,
        "ones_init",
        """
        @wakelab.hookimpl
        def init_embeddings(ctx):
            if ctx.method != "ones":
                return None
            ctx.weight[ctx.new_ids] = 1.0
            SEEN.append((ctx.num_base, list(ctx.new_words)))
            return {"value": 1.0}
        @wakelab.hookimpl
        def on_run_start(run):
            SEEN.append(run.rows.values(run.rows.new_ids).clone())
    """,
    )
    result, module = run_with(tmp_path, tiny_model, texts, plugin, **{"init.method": "ones"})
    num_base, words = module.SEEN[0]
    assert words == texts["lexicon"].read_text().split()[3:]  # the lexicon minus its comment line
    assert torch.equal(module.SEEN[1], torch.ones_like(module.SEEN[1]))
    params = mlflow.get_run(result.run_id).data.params
    assert params["init.result.value"] == "1.0"


def test_init_method_nobody_answers_is_an_error(tiny_model, texts):
    overrides = tiny_overrides(tiny_model, texts, **{"init.method": "nobody"})
    with pytest.raises(PluginError, match="no plugin answered init.method=nobody"):
        engine.run(build_config(None, None, overrides), progress=False)


def test_hook_mask_grads(tiny_model, texts, tmp_path):
    """mask_grads runs once per optimizer step, before clipping: zeroing everything freezes the rows."""
    plugin = plugin_file(
        tmp_path,
        "freeze_all",
        """
        @wakelab.hookimpl
        def mask_grads(ctx):
            SEEN.append(ctx.step)
            for p in ctx.rows.parameters():
                p.grad.zero_()
    """,
    )
    result, module = run_with(tmp_path, tiny_model, texts, plugin, **{"train.max_steps": 4, "train.logging_steps": 1})
    assert module.SEEN == [1, 2, 3, 4]
    assert result.metrics["new_row_displacement"] == 0.0
    norms = mlflow.MlflowClient().get_metric_history(result.run_id, "grad_norm")
    assert [m.value for m in norms] == [0.0] * 4  # the clip and the logged norm saw the masked gradients


def test_hook_on_step_end(tiny_model, texts, tmp_path):
    plugin = plugin_file(
        tmp_path,
        "watch_steps",
        """
        @wakelab.hookimpl
        def on_step_end(state):
            grads = state.rows.grads(state.rows.new_ids)
            SEEN.append((state.step, state.loss, state.lr, tuple(state.logits.shape), float(grads.abs().sum()),
                         state.rows.optimizer_step_count(state.optimizer)))
    """,
    )
    result, module = run_with(tmp_path, tiny_model, texts, plugin, **{"train.max_steps": 5})
    steps = [s[0] for s in module.SEEN]
    assert steps == [1, 2, 3, 4, 5]
    vocab = len(texts["lexicon"].read_text().split()) - 3 + 367
    for step, loss, lr, logits_shape, grad_sum, adam_step in module.SEEN:
        # Linear warmup starts at 0 (transformers' schedules): the first step's rate is 0, later ones rise.
        assert 0 < loss < 20 and (lr == 0 if step == 1 else lr > 0)
        assert logits_shape == (vocab,)
        assert grad_sum > 0, "on_step_end must see the gradients the optimizer used"
        assert adam_step == step
    # The loss passed to the hook is the step's loss that Trainer logs.
    logged = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(result.run_id, "loss")}
    assert logged[2] == pytest.approx((module.SEEN[0][1] + module.SEEN[1][1]) / 2, rel=1e-4)


def test_hook_on_save(tiny_model, texts, tmp_path):
    plugin = plugin_file(
        tmp_path,
        "watch_saves",
        """
        import os
        @wakelab.hookimpl
        def on_save(ctx):
            SEEN.append((ctx.step, ctx.checkpoint_dir.name, sorted(os.listdir(ctx.checkpoint_dir)), ctx.run_id))
    """,
    )
    result, module = run_with(tmp_path, tiny_model, texts, plugin, **{"train.save_steps": 2, "train.max_steps": 4})
    assert [s[:2] for s in module.SEEN] == [(2, "checkpoint-2"), (4, "checkpoint-4")]
    for _, _, files, run_id in module.SEEN:
        assert "trained_rows.safetensors" in files and "trainer_state.json" in files
        assert run_id == result.run_id


def test_hook_on_run_start(tiny_model, texts, tmp_path):
    plugin = plugin_file(
        tmp_path,
        "watch_start",
        """
        @wakelab.hookimpl
        def on_run_start(run):
            SEEN.append((run.start_step, run.optimizer is not None, run.rows.strategy, run.run_id))
            run.log_params({"watch_start.seen": "yes"})
    """,
    )
    result, module = run_with(tmp_path, tiny_model, texts, plugin)
    assert module.SEEN == [(0, True, "tokens", result.run_id)]
    assert mlflow.get_run(result.run_id).data.params["watch_start.seen"] == "yes"


def test_hook_on_run_end(tiny_model, texts, tmp_path):
    plugin = plugin_file(
        tmp_path,
        "watch_end",
        """
        @wakelab.hookimpl
        def on_run_end(run, status):
            SEEN.append(status)
            path = run.output_dir / "plugin-note.txt"
            path.write_text("done")
            run.log_artifact(path, "notes")
    """,
    )
    result, module = run_with(tmp_path, tiny_model, texts, plugin)
    assert module.SEEN == ["FINISHED"]
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "notes")]
    assert artifacts == ["notes/plugin-note.txt"]


def test_on_run_end_sees_failure(tiny_model, texts, tmp_path):
    plugin = plugin_file(
        tmp_path,
        "boom",
        """
        @wakelab.hookimpl
        def on_step_end(state):
            if state.step == 2:
                raise RuntimeError("boom at step 2")
        @wakelab.hookimpl
        def on_run_end(run, status):
            SEEN.append(status)
    """,
    )
    with pytest.raises(RuntimeError, match="boom"):
        run_with(tmp_path, tiny_model, texts, plugin)
    module = loaded_plugin(plugin)
    assert module.SEEN == ["FAILED"]


def test_misspelt_hook_is_an_error(tmp_path):
    plugin = plugin_file(
        tmp_path,
        "typo",
        """
        @wakelab.hookimpl
        def on_step_ends(state):
            pass
    """,
    )
    with pytest.raises(PluginError, match="on_step_ends"):
        registry.build_manager([str(plugin)])


def test_hook_with_wrong_arguments_is_an_error(tmp_path):
    plugin = plugin_file(
        tmp_path,
        "badargs",
        """
        @wakelab.hookimpl
        def on_step_end(step, loss):
            pass
    """,
    )
    with pytest.raises(PluginError, match="badargs"):
        registry.build_manager([str(plugin)])


def test_plugins_command_lists_sources_and_hooks(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "local_one.py").write_text(
        '"""A local plugin."""\nimport wakelab\n@wakelab.hookimpl\ndef on_save(ctx):\n    pass\n'
    )
    result = CliRunner().invoke(main, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["spherical"]["source"] == "built-in" and rows["spherical"]["hooks"] == ["init_embeddings"]
    assert rows["mask"]["hooks"] == ["mask_grads"]
    assert rows["local_one"]["source"] == "local file" and rows["local_one"]["hooks"] == ["on_save"]
    text = CliRunner().invoke(main, ["plugins"]).stdout
    assert "local_one" in text and "local file" in text


def test_local_plugin_activates_by_name(tiny_model, texts, tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "counter.py").write_text(
        "import wakelab\nCOUNT = []\n@wakelab.hookimpl\ndef on_step_end(state):\n    COUNT.append(state.step)\n"
    )
    overrides = tiny_overrides(tiny_model, texts, **{"train.max_steps": 3})
    overrides["plugins"] = ["counter"]
    engine.run(build_config(None, None, overrides), progress=False)
    module = loaded_plugin(tmp_path / "plugins" / "counter.py")
    assert module.COUNT == [1, 2, 3]


def test_failing_on_run_end_fails_the_run(tiny_model, texts, tmp_path):
    plugin = plugin_file(
        tmp_path,
        "bad_flush",
        """
        @wakelab.hookimpl
        def on_run_end(run, status):
            raise OSError("disk full while flushing")
    """,
    )
    with pytest.raises(PluginError, match="plugin '.*bad_flush.*' failed in on_run_end: OSError: disk full"):
        run_with(tmp_path, tiny_model, texts, plugin)
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["FAILED"]


def test_a_plugin_out_of_memory_at_the_end_never_loses_the_run(tiny_model, texts, tmp_path):
    """MemoryError in one plugin's on_run_end: FAILED with the plugin named, the other plugin still flushed, the
    final rows on disk and in MLflow with the logged model, and `wakelab export` exports those final rows."""
    from conftest import write_config_file
    from safetensors.torch import load_file

    oom = plugin_file(
        tmp_path,
        "oom_at_end",
        """
        @wakelab.hookimpl
        def on_run_end(run, status):
            SEEN.append((run.output_dir / "final" / "new_rows.safetensors").is_file())
            raise MemoryError("a new x base matrix")
    """,
    )
    flusher = plugin_file(
        tmp_path,
        "flusher",
        """
        @wakelab.hookimpl
        def on_run_end(run, status):
            (run.output_dir / "flushed.txt").write_text(status)
    """,
    )
    out = tmp_path / "out"
    overrides = tiny_overrides(tiny_model, texts, **{"train.max_steps": 2, "output_dir": str(out)})
    overrides["plugins"] = [str(oom), str(flusher)]
    config = write_config_file(tmp_path / "run.yaml", overrides)
    result = CliRunner().invoke(main, ["run", "--config", str(config), "--no-progress"])
    assert result.exit_code != 0
    assert "plugin 'oom_at_end' failed in on_run_end: MemoryError: a new x base matrix" in result.output
    assert "wakelab export works on this run" in result.output
    assert "Traceback" not in result.output
    assert loaded_plugin(oom).SEEN == [True]  # the final rows were on disk before its end-of-run work began
    assert (out / "flushed.txt").read_text() == "FINISHED"  # the other plugin still ran (with the status it saw)

    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "final")}
    assert "final/new_rows.safetensors" in artifacts
    assert mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")

    dest = tmp_path / "hf"
    exported = CliRunner().invoke(main, ["export", str(out), "--to", str(dest)])
    assert exported.exit_code == 0, exported.output
    assert "after its final rows were written: exporting them" in exported.output
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dest)
    final = load_file(str(out / "final" / "new_rows.safetensors"))
    torch.testing.assert_close(
        model.get_input_embeddings().weight[final["token_ids"]].float(), final["rows"].float(), rtol=0, atol=0
    )


def test_hook_config_section(tiny_model, texts, tmp_path):
    """A plugin's own section is validated with the config, reaches the plugin as run.config.<name>, and is logged."""
    plugin = plugin_file(
        tmp_path,
        "sectioned",
        """
        from pydantic import Field
        class Settings(wakelab.PluginConfig):
            every: int = Field(3, ge=1, description="Steps between looks.")
        @wakelab.hookimpl
        def config_section():
            return "sectioned", Settings
        @wakelab.hookimpl
        def on_step_end(state):
            if state.step % RUN[0].config.sectioned.every == 0:
                SEEN.append(state.step)
        RUN = []
        @wakelab.hookimpl
        def on_run_start(run):
            RUN.append(run)
    """,
    )
    result, module = run_with(tmp_path, tiny_model, texts, plugin, **{"train.max_steps": 4, "sectioned.every": 2})
    assert module.SEEN == [2, 4]
    assert mlflow.get_run(result.run_id).data.params["sectioned.every"] == "2"


def test_hook_check_config(tiny_model, texts, tmp_path):
    plugin = plugin_file(
        tmp_path,
        "picky",
        """
        @wakelab.hookimpl
        def check_config(config):
            if config.train.max_steps > 3:
                raise wakelab.ConfigError("train.max_steps: picky runs at most 3 steps; set train.max_steps <= 3")
    """,
    )
    overrides = tiny_overrides(tiny_model, texts, **{"train.max_steps": 4})
    overrides["plugins"] = [str(plugin)]
    with pytest.raises(ConfigError, match="picky runs at most 3 steps"):
        build_config(None, None, overrides)
    assert build_config(None, None, {**overrides, "train.max_steps": 3}).train.max_steps == 3


def test_hook_check_inputs(tiny_model, texts, tmp_path):
    """Asked once the base model's config, the tokenizer and the corpus are read: what it refuses leaves no run
    directory and no MLflow run behind."""
    plugin = plugin_file(
        tmp_path,
        "deep_only",
        """
        @wakelab.hookimpl
        def check_inputs(ctx):
            SEEN.append((ctx.model_config.num_hidden_layers, ctx.num_base, len(ctx.new_words), len(ctx.corpus_ids)))
            if ctx.model_config.num_hidden_layers < 3:
                raise wakelab.ConfigError("deep_only needs 3 layers or more; the base has "
                                          f"{ctx.model_config.num_hidden_layers}")
    """,
    )
    overrides = tiny_overrides(tiny_model, texts, **{"output_dir": str(tmp_path / "out")})
    overrides["plugins"] = [str(plugin)]
    with pytest.raises(ConfigError, match="deep_only needs 3 layers or more; the base has 2"):
        engine.run(build_config(None, None, overrides), progress=False)
    layers, num_base, words, tokens = loaded_plugin(plugin).SEEN[0]
    assert layers == 2 and words == len(texts["lexicon"].read_text().split()[3:]) and tokens > 0 and num_base > 0
    assert not (tmp_path / "out").exists()
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_failing_on_save_warns_while_training_and_mirroring_go_on(tiny_model, texts, tmp_path, capfd):
    plugin = plugin_file(
        tmp_path,
        "bad_copy",
        """
        @wakelab.hookimpl
        def on_save(ctx):
            SEEN.append(ctx.step)
            raise OSError(f"snapshot disk gone at {ctx.step}")
    """,
    )
    overrides = tiny_overrides(
        tiny_model, texts, **{"train.save_steps": 2, "train.max_steps": 4, "sentry.target": str(tmp_path / "mirror")}
    )
    overrides["plugins"] = [str(plugin), "sentry"]
    result = engine.run(build_config(None, None, overrides), progress=False)
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("wakelab: warning: on_save of plugin")]
    assert len(warnings) == 2, err
    for line, step in zip(warnings, (2, 4), strict=False):
        assert line.endswith(f"failed at step {step} (OSError: snapshot disk gone at {step}); training goes on")
    assert loaded_plugin(plugin).SEEN == [2, 4]
    assert mlflow.get_run(result.run_id).info.status == "FINISHED"
    assert max(m.step for m in mlflow.MlflowClient().get_metric_history(result.run_id, "loss")) == 4
    from wakelab.storage.checkpoints import list_checkpoints

    mirrors = list_checkpoints(tmp_path / "mirror" / result.run_id)
    assert [m.name for m in mirrors] == ["checkpoint-2", "checkpoint-4"], "the Sentry mirror ran after the failure"


def test_ctrl_c_reaches_on_run_end_as_killed(tiny_model, texts, tmp_path):
    """A real SIGINT to `wakelab run` mid-step: the step finishes, on_run_end sees KILLED, MLflow records KILLED."""
    import os
    import signal
    import subprocess
    import sys
    import time

    plugin = plugin_file(
        tmp_path,
        "wait_for_ctrl_c",
        f"""
        import pathlib, time
        @wakelab.hookimpl
        def on_step_end(state):
            if state.step == 2:
                pathlib.Path({str(tmp_path / "at-step-2")!r}).write_text("ready")
                time.sleep(10)  # Ctrl-C lands while this step is in flight: the run stops after it
        @wakelab.hookimpl
        def on_run_end(run, status):
            pathlib.Path({str(tmp_path / "status")!r}).write_text(status)
    """,
    )
    args = ["run", "--no-progress", "--plugin", str(plugin)]
    for key, value in tiny_overrides(tiny_model, texts, **{"train.max_steps": 50}).items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "wakelab", *args],
        cwd=tmp_path,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "at-step-2").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert (tmp_path / "status").read_text() == "KILLED"
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["KILLED"]


def test_a_plugin_class_holds_each_runs_state_on_its_own_instance(tiny_model, texts, tmp_path):
    """A module's ``Plugin`` class is made anew for every run: two runs in one process never share its state."""
    (tmp_path / "plugins").mkdir()
    plugin = plugin_file(
        tmp_path / "plugins",  # found by name too, so `wakelab plugins` lists it below
        "counting",
        """
        class Plugin:
            def __init__(self):
                self.steps = 0

            @wakelab.hookimpl
            def on_step_end(self, state):
                self.steps += 1

            @wakelab.hookimpl
            def on_run_end(self, run, status):
                SEEN.append((id(self), self.steps, status))
    """,
    )
    run_with(tmp_path, tiny_model, texts, plugin, **{"train.max_steps": 3})
    _, module = run_with(
        tmp_path, tiny_model, texts, plugin, **{"train.max_steps": 2, "output_dir": str(tmp_path / "2")}
    )
    (first, steps_1, status_1), (second, steps_2, status_2) = module.SEEN
    assert first != second and (steps_1, steps_2) == (3, 2) and status_1 == status_2 == "FINISHED"
    row = {r["name"]: r for r in registry.describe(tmp_path)}  # what `wakelab plugins` lists: the class's hooks
    assert row["counting"]["error"] is None and row["counting"]["hooks"] == ["on_run_end", "on_step_end"]


def test_a_plugin_class_only_counts_where_it_is_defined(tmp_path):
    """An imported class that happens to be called ``Plugin`` is not the plugin: the module is registered."""
    plugin = plugin_file(
        tmp_path,
        "borrowing",
        """
        from dataclasses import dataclass as Plugin

        @wakelab.hookimpl
        def on_save(ctx):
            pass
    """,
    )
    pm = registry.build_manager([str(plugin)])
    assert pm.get_plugin("borrowing") is loaded_plugin(plugin)


@pytest.mark.parametrize("name", ["recorder", "sentry", "trajectory"])
def test_built_in_plugins_keep_per_run_state_on_an_instance_not_in_module_globals(name):
    import ast
    import importlib

    module = importlib.import_module(f"wakelab.plugins.{name}")
    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)], f"{name}: a `global` statement"
    first, second = registry.build_manager([name]), registry.build_manager([name])
    assert isinstance(first.get_plugin(name), module.Plugin)
    assert first.get_plugin(name) is not second.get_plugin(name)
    rows = {row["name"]: row for row in registry.describe()}
    assert rows[name]["doc"] == module.__doc__.strip().splitlines()[0]  # `wakelab plugins` shows the module's line
