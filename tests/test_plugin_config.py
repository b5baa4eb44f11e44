"""A plugin's own config section: set like a core one, validated before the run, listed, and refused clearly."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from click.testing import CliRunner
from test_bad_input import assert_refused, invoke

from wakelab.cli.main import main
from wakelab.config import build_config, reference_markdown
from wakelab.errors import ConfigError, PluginError

SECTION_PLUGIN = """
import wakelab
from pydantic import Field

class Settings(wakelab.PluginConfig):
    \"\"\"A test plugin's settings.\"\"\"
    every: int = Field(3, ge=1, description="Steps between looks.")
    label: str = Field("x", description="A name.")

@wakelab.hookimpl
def config_section():
    return "{section}", Settings
"""


def section_plugin(tmp_path, name, section=None):
    path = tmp_path / "plugins" / f"{name}.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(SECTION_PLUGIN).format(section=section or name))
    return path


def test_plugin_section_has_defaults_and_takes_set_file_and_dict_values(tmp_path):
    section_plugin(tmp_path, "looker")
    config = build_config("demo", plugins=["looker"])
    assert (config.looker.every, config.looker.label) == (3, "x")
    assert config.flat()["looker.every"] == 3  # logged as a param like every core key
    assert build_config("demo", overrides=["looker.every=7"], plugins=["looker"]).looker.every == 7
    file = tmp_path / "my.yaml"
    file.write_text(yaml.safe_dump({"plugins": ["looker"], "looker": {"label": "y"}}))
    assert build_config("demo", file).looker.label == "y"
    assert build_config("demo", None, {"plugins": ["looker"], "looker.every": 2}).looker.every == 2


def test_plugin_key_errors_name_the_plugin_and_key(tmp_path):
    section_plugin(tmp_path, "looker")
    with pytest.raises(ConfigError, match=r"plugin 'looker': config key 'looker.every': got 0; Input should be"):
        build_config("demo", overrides=["looker.every=0"], plugins=["looker"])
    with pytest.raises(ConfigError, match=r"plugin 'looker': unknown config key 'looker.evry'; did you mean looker.ev"):
        build_config("demo", overrides=["looker.evry=2"], plugins=["looker"])


def test_set_for_an_inactive_plugin_is_refused_but_a_preset_block_is_not(tmp_path):
    section_plugin(tmp_path, "looker")
    with pytest.raises(ConfigError, match="belongs to plugin 'looker', which is not active, so it would be ignored"):
        build_config("demo", overrides=["looker.every=2"])
    # p1_evolved's preset has recorder: and sentry: blocks; switching those plugins off leaves them out quietly.
    config = build_config("p1_evolved", overrides=["plugins=[]", "model.name_or_path=demo"])
    assert not hasattr(config, "recorder") and "recorder.every" not in config.flat()


def test_a_section_no_plugin_declares_is_an_unknown_key():
    with pytest.raises(ConfigError, match="unknown config key 'nosuch.every'"):
        build_config("demo", overrides=["nosuch.every=2"])


def test_two_plugins_claiming_one_section(tmp_path):
    section_plugin(tmp_path, "first", "shared")
    section_plugin(tmp_path, "second", "shared")
    with pytest.raises(PluginError, match="plugins 'first' and 'second' both claim the config section 'shared'"):
        build_config("demo", plugins=["first", "second"])


def test_a_plugin_may_not_take_a_core_section(tmp_path):
    section_plugin(tmp_path, "greedy", "train")
    with pytest.raises(PluginError, match="claims the config section 'train', which is wakelab's own"):
        build_config("demo", plugins=["greedy"])


def test_builtin_sections_moved_into_their_plugins():
    config = build_config("wordybird")
    assert type(config.recorder).__module__ == "wakelab.plugins.recorder"
    assert "recorder" not in build_config("demo").model_dump()
    text = reference_markdown()
    assert "## recorder (plugin `recorder`)" in text and "`recorder.every`" in text and "`sentry.target`" in text


def test_config_keys_and_plugins_list_plugin_keys(tmp_path):
    section_plugin(tmp_path, "looker")
    keys = CliRunner().invoke(main, ["config-keys"])
    assert keys.exit_code == 0
    assert "looker.every = 3    (plugin looker)" in keys.output
    assert "recorder.every = 1    (plugin recorder)" in keys.output
    listing = CliRunner().invoke(main, ["plugins"])
    line = next(line for line in listing.output.splitlines() if "config: recorder.fields" in line)
    assert "recorder.every" in line
    assert any(row.startswith("recorder ") and "0.1.0" in row for row in listing.output.splitlines())


def test_a_plugin_with_a_missing_dependency_is_listed_broken_and_stops_a_run(tiny_model, texts, tmp_path):
    broken = tmp_path / "plugins" / "needs_dep.py"
    broken.parent.mkdir(exist_ok=True)
    broken.write_text("import wakelab\nimport wakelab_no_such_dependency\n")
    listing = CliRunner().invoke(main, ["plugins"])
    line = next(line for line in listing.output.splitlines() if line.startswith("needs_dep"))
    assert "BROKEN" in line and "No module named 'wakelab_no_such_dependency'" in line
    result = invoke(tiny_model, texts, "--plugin", "needs_dep")
    assert_refused(result, "No module named 'wakelab_no_such_dependency'", tmp_path)


def test_bad_plugin_key_on_the_command_line_writes_nothing(tiny_model, texts, tmp_path):
    result = invoke(tiny_model, texts, "--plugin", "recorder", **{"recorder.every": "often"})
    assert_refused(result, "plugin 'recorder': config key 'recorder.every': got \"often\"", tmp_path)
    result = invoke(tiny_model, texts, **{"recorder.every": 2})
    assert_refused(result, "belongs to plugin 'recorder', which is not active", tmp_path)
