"""The one home of every run setting: defaults, units and validation sit next to each value.

A run's config is resolved in layers — packaged preset, then ``--config FILE``, then ``--set key=value`` — and the
result is a frozen ``RunConfig`` that everything downstream reads. Every error names the key and the form it expects.
"""

from __future__ import annotations

from .reference import reference_markdown
from .resolve import (
    all_keys,
    build_config,
    describe_validation_error,
    load_config_file,
    load_preset,
    merge,
    parse_value,
    plugin_section,
    preset_names,
    resolve_hint,
    resolve_key,
    set_in,
    validate,
)
from .sections import (
    ALIASES,
    DTYPES,
    SECTIONS,
    DataConfig,
    InitConfig,
    ModelConfig,
    PluginConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    VocabConfig,
    flatten,
)

__all__ = [
    "ALIASES",
    "DTYPES",
    "DataConfig",
    "InitConfig",
    "ModelConfig",
    "PluginConfig",
    "RunConfig",
    "SECTIONS",
    "TrackingConfig",
    "TrainConfig",
    "VocabConfig",
    "all_keys",
    "build_config",
    "describe_validation_error",
    "flatten",
    "load_config_file",
    "load_preset",
    "merge",
    "parse_value",
    "plugin_section",
    "preset_names",
    "reference_markdown",
    "resolve_hint",
    "resolve_key",
    "set_in",
    "validate",
]
