"""The config: presets, files and overrides resolve into one validated RunConfig; errors name key and form."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from wakelab.config import build_config, preset_names, reference_markdown, resolve_key
from wakelab.errors import ConfigError, PluginError


def test_demo_preset_resolves_with_defaults():
    config = build_config("demo")
    assert config.preset == "demo"
    assert config.model.name_or_path == "demo"
    assert config.train.trainable == "tokens"
    assert config.init.radius_scale == 1.5
    assert config.resolved_output_dir.as_posix() == "runs/demo"


def test_layers_apply_in_order(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("train:\n  lr: 0.5\n  max_steps: 7\n")
    config = build_config("demo", file, ["train.lr=1e-3", "seq_len=64"])
    assert config.train.lr == 1e-3  # --set beats the file
    assert config.train.max_steps == 7  # the file beats the preset
    assert config.data.seq_len == 64  # alias


def test_warmup_default_is_max_20_or_a_twentieth():
    assert build_config("demo", overrides={"train.max_steps": 6000}).train.effective_warmup == 300
    assert build_config("demo", overrides={"train.max_steps": 100}).train.effective_warmup == 20
    assert build_config("demo", overrides={"train.max_steps": 10}).train.effective_warmup == 10


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*train.lr"):
        build_config("demo", overrides=["train.lrr=1"])


def test_unknown_key_in_file_is_named(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.learning_rate'"):
        build_config("demo", file)


def test_wrong_type_names_key_and_expected_form():
    with pytest.raises(
        ConfigError, match=r"config key 'train.max_steps': got \"many\"; Input should be a valid integer"
    ):
        build_config("demo", overrides=["train.max_steps=many"])


def test_bad_choice_lists_choices():
    with pytest.raises(ConfigError, match=r"train.trainable.*'tokens', 'mask' or 'full'"):
        build_config("demo", overrides=["train.trainable=rows"])


def test_out_of_range_value():
    with pytest.raises(ConfigError, match=r"train.lr.*greater than 0"):
        build_config("demo", overrides=["train.lr=0"])


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: .*demo"):
        build_config("nope")


def test_set_without_equals():
    with pytest.raises(ConfigError, match="must be key=value"):
        build_config("demo", overrides=["train.lr"])


def test_mask_with_rows_dtype_is_refused():
    with pytest.raises(ConfigError, match="rows_dtype"):
        build_config("demo", overrides=["trainable=mask", "train.rows_dtype=float32"])


def test_active_plugins_follow_the_config():
    assert build_config("demo").active_plugins == ("trajectory", "spherical")  # the demo ends with its pictures
    masked = build_config("demo", overrides=["trainable=mask", "plugins=[recorder]"])
    assert masked.active_plugins == ("recorder", "spherical", "mask")
    with pytest.raises(PluginError, match="unknown plugin 'extra'; available: distill, mask, mean"):
        build_config("demo", overrides=["plugins=[extra]"])  # found while the config is resolved, before any run


def test_config_is_frozen():
    config = build_config("demo")
    with pytest.raises(ValidationError, match="frozen"):
        config.train.lr = 1.0


def _documented_defaults(text: str) -> dict[str, str]:
    """key -> default, read from the reference's tables (the first backquoted cell after the key)."""
    found = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 3:
            found[cells[0].strip("`")] = next(c for c in cells[1:] if c.startswith("`")).strip("`")
    return found


def test_reference_documents_what_configs_really_use():
    """Checked against what the generator never reads: hand-written presets, a resolved config, the docs file."""
    import json
    from importlib.resources import files
    from pathlib import Path

    import yaml

    text = reference_markdown()
    documented = _documented_defaults(text)
    assert "demo" in preset_names()
    # Every key a packaged preset sets (the presets are written by hand) is documented.
    for preset in files("wakelab.config").joinpath("presets").iterdir():
        if not preset.name.endswith(".yaml"):
            continue
        for key, value in yaml.safe_load(preset.read_text()).items():
            keys = [f"{key}.{leaf}" for leaf in value] if isinstance(value, dict) else [key]
            assert not set(keys) - set(documented), f"{preset.name} sets undocumented {set(keys) - set(documented)}"
    # The documented default is what a config resolves to when nothing sets the key.
    resolved = build_config(None, overrides={"vocab.lexicon": "words.txt"}).flat()
    resolved.pop("vocab.lexicon")
    for key, value in resolved.items():
        shown = "null" if value is None else value if isinstance(value, str) else json.dumps(value)
        assert documented.get(key) == shown, key
    assert documented["train.trainable"] == "tokens" and documented["init.radius_scale"] == "1.5"
    # What users read is current (`make docs` regenerates it).
    assert (Path(__file__).parents[1] / "docs" / "configuration.md").read_text() == text


def test_resolve_key_by_unique_leaf():
    assert resolve_key("radius_scale") == "init.radius_scale"
    assert resolve_key("init") == "init.method"
