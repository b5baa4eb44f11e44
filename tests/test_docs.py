"""The docs stay true: the generated reference matches the config, the worked example runs, --help has examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tiny_overrides

from wakelab.cli.main import main
from wakelab.config import build_config, reference_markdown
from wakelab.run import engine

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_current():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == reference_markdown(), "run `make docs` to regenerate docs/configuration.md"


def test_command_reference_is_current():
    from wakelab.cli.main import help_markdown

    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == help_markdown(), "run `make docs` to regenerate docs/cli.md"


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


@pytest.mark.parametrize("command", ["run", "plugins", "config-keys", "show-config", "presets"])
def test_every_command_help_has_an_example(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and "wakelab " in result.output.split("Example", 1)[1]


def test_all_registered_commands_have_examples():
    for name, command in main.commands.items():
        help_text = command.help or ""
        assert "Example" in help_text, f"`wakelab {name} --help` has no example"


def test_worked_example_plugin_runs(tiny_model, texts, tmp_path, monkeypatch):
    overrides = tiny_overrides(tiny_model, texts, **{"train.max_steps": 10, "top_movers.top": 4})
    overrides["plugins"] = ["top_movers"]
    result = engine.run(build_config(None, None, overrides, cwd=ROOT), progress=False, cwd=ROOT)
    table = json.loads((result.output_dir / "top_movers.json").read_text())
    assert len(table) == 4  # its own config section: top_movers.top
    assert table == sorted(table, key=lambda row: -row["displacement"])
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(result.run_id, "top_movers.max_displacement")
    assert [m.step for m in history] == [10]
    assert history[0].value == pytest.approx(table[0]["displacement"], rel=1e-5)
    assert mlflow.get_run(result.run_id).data.params["top_movers.every"] == "10"


# -- the README's and the quickstart's code blocks: each command parses against its CLI, each YAML builds a config --
DOC_PAGES = ["README.md", "docs/quickstart.md"]


def code_blocks(page: str) -> list[tuple[str, str]]:
    import re

    text = (ROOT / page).read_text(encoding="utf-8")
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def parse_click(group, name: str, args: list[str]) -> None:
    """Parse ``args`` against a click group down to the leaf command (options, arguments, choices), running nothing."""
    import click

    ctx = group.make_context(name, list(args))
    command = group
    while isinstance(command, click.Group):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        sub_name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(sub_name, rest, parent=ctx)


def check_shell_command(words: list[str], page: str) -> None:
    import tomllib

    where = f"{page}: `{' '.join(words)}`"
    program, args = words[0], words[1:]
    if program == "wakelab":
        parse_click(main, "wakelab", args)
    elif program == "mlflow":
        from mlflow.cli import cli as mlflow_cli

        parse_click(mlflow_cli, "mlflow", args)
    elif program == "make":
        makefile = (ROOT / "Makefile").read_text()
        assert all(f"\n{target}:" in makefile for target in args), f"{where}: no such make target"
    elif program == "pip":
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        extras = project["optional-dependencies"]
        assert args[0] == "install", where
        for arg in args[1:]:
            if arg.startswith(".["):
                assert all(e in extras for e in arg[2:-1].split(",")), f"{where}: no such extra"
            elif not arg.startswith("-") and arg != ".":
                # a package named on its own is one an extra brings (the --no-deps route around its build)
                assert any(arg in dep for deps in extras.values() for dep in deps), f"{where}: {arg} is in no extra"
    elif program == "git":
        assert args[0] == "clone" and args[-1] == "wakelab", where
    elif program == "cd":
        assert args == ["wakelab"], where
    elif program == "source":
        assert args == [".venv/bin/activate"] and "VENV   := .venv" in (ROOT / "Makefile").read_text(), where
    else:
        raise AssertionError(f"{where}: no check for `{program}` lines; add one to tests/test_docs.py")


@pytest.mark.parametrize("page", DOC_PAGES)
def test_every_code_block_is_checked(page, tmp_path, monkeypatch):
    import shlex

    import yaml

    monkeypatch.chdir(tmp_path)
    blocks = code_blocks(page)
    assert blocks, page
    for language, body in blocks:
        if language == "bash":
            for line in body.splitlines():
                words = shlex.split(line.replace("<", "'<").replace(">", ">'"), comments=True)
                command: list[str] = []
                for word in [*words, "&&"]:
                    if word == "&&":
                        assert command, f"{page}: an empty command in `{line}`"
                        check_shell_command(command, page)
                        command = []
                    else:
                        command.append(word)
        elif language == "yaml":
            data = yaml.safe_load(body)
            (tmp_path / "my.yaml").write_text(body)
            config = build_config(None, "my.yaml", [])
            for section, keys in data.items():
                if isinstance(keys, dict):
                    for key, value in keys.items():
                        assert getattr(getattr(config, section), key) == value, (page, section, key)
                else:
                    assert getattr(config, section) == keys, (page, section)
        elif language == "text":
            # The demo's closing lines, as the CLI prints them.
            source = (ROOT / "src" / "wakelab" / "cli" / "run.py").read_text()
            assert "look at it in the MLflow UI:" in body and "look at it in the MLflow UI:" in source, page
            assert "FINISHED" in body and "heldout_perplexity_after" in body, page
        else:
            raise AssertionError(f"{page}: a ```{language} block with no check; add one to tests/test_docs.py")
