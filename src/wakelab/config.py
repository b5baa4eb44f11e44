"""The one home of every run setting: defaults, units and validation sit next to each value.

A run's config is resolved in layers — packaged preset, then ``--config FILE``, then ``--set key=value`` — and the
result is a frozen ``RunConfig`` that everything downstream reads. Every error names the key and the form it expects.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from .errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class PluginConfig(_Section):
    """Base of a plugin's own config section (``wakelab.PluginConfig``): unknown keys are errors, values frozen.

    Declare fields with defaults, units in the description and pydantic validation, as the core sections do.
    """


class ModelConfig(_Section):
    """The pretrained base model."""

    name_or_path: str = Field(
        "demo",
        description="Hub id or local folder for `from_pretrained`; `demo` is the embedded SmolLM2-135M-Instruct.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when loading by id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the model's parameters when loaded."
    )
    load_in_4bit: bool = Field(False, description="Quantize the base to 4-bit nf4 through bitsandbytes (CPU or CUDA).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Compute dtype of the 4-bit layers (and dtype of the unquantized ones)."
    )
    from_config: bool = Field(
        False,
        description="Build the architecture from the folder's config.json with random weights (no weights needed).",
    )
    architecture: dict[str, Any] | None = Field(
        None,
        description=(
            "Build a model from scratch with these transformers config values (`model_type` first, e.g. gpt2 with "
            "n_embd, n_layer, ...); random weights seeded by train.seed; name_or_path is then unused."
        ),
    )
    tokenizer: str | None = Field(
        None,
        description=(
            "Tokenizer folder or hub id (None: the model's); `gcide-bpe` or `offline-bpe` builds a byte-level BPE "
            "offline (docs/presets.md)."
        ),
    )
    tokenizer_vocab_size: int = Field(
        50257, ge=260, description="Size of the `gcide-bpe` and `offline-bpe` tokenizers."
    )

    @field_validator("architecture")
    @classmethod
    def _architecture_has_type(cls, value: Any) -> Any:
        if value is not None and "model_type" not in value:
            raise ValueError("model.architecture needs a `model_type` (e.g. gpt2, llama)")
        return value


class VocabConfig(_Section):
    """The lexicon whose words become new tokens."""

    lexicon: str | None = Field(
        None, description="UTF-8 file, one word per line; blank lines and `#` comments skipped. None: add no tokens."
    )
    add_as: Literal["word", "plain"] = Field(
        "word",
        description=(
            "`word`: the word with its leading space, AddedToken(' riverrun'), so ' riverrun' is one token with no "
            "stray space token and decodes back with its space; `plain`: the bare string, as "
            "`add_tokens(list_of_str)` does."
        ),
    )
    normalize: Literal["nfc", "none"] = Field(
        "nfc",
        description=(
            '`nfc`: lexicon words are compared and added in Unicode NFC, so "café" typed composed or decomposed '
            "is one word, and a run with a lexicon reads its corpus and held-out text in NFC too, so the word meets "
            "its token in either form; `none`: as written (words in more than one form are still reported)."
        ),
    )
    max_word_chars: int = Field(
        128, ge=1, description="Longer lexicon lines are rejected (with their reason in the vocabulary report)."
    )


class DataConfig(_Section):
    """The corpus and how it is cut into training blocks."""

    corpus: str | None = Field(
        None,
        description=(
            "UTF-8 training text; `demo` uses the embedded demo corpus, `gcide` a ~2 MB slice of the GCIDE dictionary "
            "(`apt-get install dict-gcide`)."
        ),
    )
    heldout: str | None = Field(None, description="UTF-8 held-out text for perplexity; None: split off the corpus.")
    heldout_fraction: float = Field(
        0.05, ge=0.0, lt=0.5, description="Share of the corpus's blocks held out when no `heldout` file is given."
    )
    seq_len: int = Field(128, ge=2, le=131072, description="Tokens per training block.")
    stride: int | None = Field(None, ge=1, description="Tokens between block starts; None: = seq_len (no overlap).")
    shift: Literal["model", "explicit", "double"] = Field(
        "model",
        description=(
            "`model`: labels = input ids, the model shifts them; `explicit`: blocks of seq_len + 1 with input = "
            "block[:-1], next-token targets block[1:]; `double`: the Wordybird notebook's objective as it ran "
            "(its TokenDataset's labels = block[1:], shifted once more by the model: predicts the token after next)."
        ),
    )
    cache_dir: str | None = Field(None, description="Where tokenized corpora are cached by content hash.")

    @property
    def effective_stride(self) -> int:
        return self.stride or self.seq_len


class InitConfig(_Section):
    """How the new rows start."""

    method: str = Field(
        "spherical",
        description=(
            "Name of the `init_embeddings` plugin that fills the new rows: `spherical` (random directions at "
            "radius_scale x the base norm), `mean` (drawn from the base rows' mean and covariance), `subword` (mean "
            "of the word's base sub-tokens), `distill` (subword rows then token distillation on the corpus; its "
            "`distill` section), or a plugin's."
        ),
    )
    radius_scale: float = Field(
        1.5, gt=0, description="spherical: radius of the new rows as a multiple of the mean base-row L2 norm."
    )
    scale: float = Field(
        1.0,
        gt=0,
        description=(
            "mean (and subword's fall-back): the sampled rows' covariance is scale x the base rows' covariance "
            "(1: spread like the base rows; transformers' 1e-9 makes all new rows the same)."
        ),
    )
    seed: int = Field(0, description="Seed of the init's random draws.")
    from_embeddings: str | None = Field(
        None, description="Embedding matrix (safetensors, or .pt read weights-only) that replaces all rows after init."
    )
    constituents: str | None = Field(
        None,
        description=(
            "File of `word<TAB>meaning_word<TAB>part1 part2` lines naming the base words each new word should end up "
            "near (`wakelab sweep` reports the nearest-neighbour hit rate); `demo`: the demo's; None: the demo's "
            "when vocab.lexicon is `demo`, else none."
        ),
    )

    @field_validator("constituents")
    @classmethod
    def _constituents_path(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("give a path to a constituents file, `demo`, or null")
        return value.strip() if value is not None else None


class TrainConfig(_Section):
    """The optimisation, handed to transformers.Trainer."""

    trainable: Literal["tokens", "mask", "full"] = Field(
        "tokens",
        description=(
            "`tokens`: only the new rows are a trainable tensor; `mask`: the whole embedding matrix trains and "
            "base-row gradients are zeroed; `full`: every parameter trains."
        ),
    )
    rows_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the trainable new rows (`tokens`); auto = the base embedding's dtype."
    )
    max_steps: int = Field(60, ge=1, description="Optimizer steps.")
    lr: float = Field(5e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (never applied to base rows).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    optimizer: Literal["adamw_torch_fused", "adamw_torch"] = Field(
        "adamw_torch_fused",
        description=(
            "torch AdamW's implementation (Trainer's `optim`): `adamw_torch_fused` updates each tensor in one "
            "kernel, with no parameter-sized temporaries (the lower peak memory; Trainer's default); `adamw_torch` "
            "the per-operation loop wakelab used before, whose rounding can differ in the last bit (bf16: the "
            "fused kernel computes in fp32). `train.precision` other than bf16 brings its own AdamW."
        ),
    )
    batch_size: int = Field(4, ge=1, description="Blocks per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps; None: max(20, max_steps // 20).")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0: no clipping).")
    logging_steps: int = Field(10, ge=1, description="Steps between logged metrics.")
    save_steps: int = Field(0, ge=0, description="Steps between checkpoints (0: no checkpoints).")
    save_total_limit: int | None = Field(None, ge=1, description="Checkpoints kept (None: all).")
    seed: int = Field(42, description="Seed of data order, dropout and from-scratch weights.")
    resume_from: str | None = Field(
        None,
        description=(
            "Start from this checkpoint of another run (weights, optimizer, scheduler, step) into a new run: "
            "Wordybird 3's continuation. `wakelab resume` continues the same run instead."
        ),
    )
    resume_schedule: Literal["saved", "fresh"] = Field(
        "saved",
        description=(
            "With train.resume_from: `saved` continues the checkpoint's learning-rate schedule; `fresh` starts a new "
            "schedule (warmup, decay) over this run's remaining steps, as a new Trainer does (Wordybird 3)."
        ),
    )
    precision: Literal["bf16", "fp32-master", "stochastic", "kahan"] = Field(
        "bf16",
        description=(
            "How updates reach bf16 trained parameters: `bf16` AdamW steps them directly (round to nearest; any "
            "dtype); `fp32-master` fp32 master copies the optimizer steps, copied to the bf16 parameters after each "
            "step; `stochastic` bf16 storage, stochastically rounded updates; `kahan` bf16 storage with "
            "Kahan-compensated updates. The last three need bf16 trained parameters."
        ),
    )
    bf16_autocast: bool = Field(False, description="Run forward/backward under bf16 autocast (mixed precision).")
    loss_chunk_tokens: int | None = Field(
        256,
        ge=1,
        description=(
            "Tokens per chunk of the loss, which never holds the whole batch's vocabulary-sized logits (memory: "
            "chunk x vocab fp32); None: transformers' own loss over full logits."
        ),
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description=(
            "Under torchrun (several processes): `ddp`, a whole model on every process; `fsdp`, the frozen base "
            "sharded across the processes with FSDP2 (every decoder layer, then the rest), the rows that train whole "
            "on each (`tokens`, `full`; docs/scale.md). A single process: no effect."
        ),
    )
    eval_perplexity: bool = Field(True, description="Measure held-out perplexity before and after training.")
    eval_max_blocks: int = Field(32, ge=1, description="Held-out blocks used for perplexity.")

    @field_validator("loss_chunk_tokens", mode="before")
    @classmethod
    def _chunk_is_integer(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("give a whole number of tokens >= 1 (e.g. 256), or null for the full-logits loss")
        return value

    @property
    def effective_warmup(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(max(20, self.max_steps // 20), self.max_steps)


class TrackingConfig(_Section):
    """Where and how the run is tracked in MLflow."""

    experiment: str = Field("wakelab", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name; None: `<preset>-<time>`.")
    log_tokenizer: bool = Field(True, description="Log the expanded tokenizer as an artifact.")
    log_model: Literal["delta", "full", "none"] = Field(
        "delta",
        description=(
            "The run's logged model in MLflow: `delta` (new rows, ids, tokenizer and the base's name and checksum; "
            "small), `full` (the merged model, transformers flavour), `none`."
        ),
    )
    log_datasets: bool = Field(
        True,
        description="Log the corpus, held-out text and lexicon as MLflow datasets (the runs table's Dataset column).",
    )
    system_metrics: bool = Field(
        True, description="Log MLflow system metrics (CPU, memory, GPU when there is one) every 10 s during the run."
    )


class RunConfig(_Section):
    """A whole run. Sections: model, vocab, data, init, train, tracking; plus plugins and output_dir.

    The active plugins' own sections (``recorder``, ``sentry``, ...) are added as fields of a subclass built by
    ``validate`` (see ``wakelab.plugin_config``), so ``config.recorder`` reads like a core section.
    """

    preset: str | None = Field(None, description="The preset this config started from.")
    output_dir: str = Field(
        "runs/{preset}",
        description="The run's directory; `{preset}` is replaced, and `{run_id}` by MLFLOW_RUN_ID under `mlflow run`.",
    )
    plugins: tuple[str, ...] = Field((), description="Plugins to activate (names or paths to .py files).")
    model: ModelConfig = ModelConfig()
    vocab: VocabConfig = VocabConfig()
    data: DataConfig = DataConfig()
    init: InitConfig = InitConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("plugins", mode="before")
    @classmethod
    def _plugins_as_tuple(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        if self.train.trainable == "mask" and self.train.rows_dtype != "auto":
            raise ValueError(
                "train.rows_dtype: with train.trainable=mask the rows share the embedding matrix's dtype; "
                "use rows_dtype=auto or trainable=tokens"
            )
        if self.model.architecture is not None and self.model.load_in_4bit:
            raise ValueError("model.load_in_4bit: a model built from model.architecture has no weights to quantize")
        if self.train.trainable != "full" and self.vocab.lexicon is None:
            raise ValueError(
                f"vocab.lexicon: train.trainable={self.train.trainable} trains new rows, so a lexicon is needed "
                "(or set train.trainable=full)"
            )
        if self.train.precision != "bf16":
            from .precision import trained_dtype_problem

            problem = trained_dtype_problem(self)
            if problem:
                raise ValueError(problem)
        if self.train.distributed == "fsdp" and self.train.trainable == "mask":
            raise ValueError(
                "train.distributed=fsdp does not support train.trainable=mask (its mask_grads hook needs the whole "
                "embedding gradient, which FSDP shards); use train.trainable=tokens, or train.distributed=ddp"
            )
        if self.train.distributed == "fsdp" and self.train.grad_accum > 1:
            raise ValueError(
                "train.distributed=fsdp takes train.grad_accum=1 (Trainer defers FSDP's gradient reduction only for "
                "models transformers sharded itself); raise train.batch_size or the number of processes instead"
            )
        if self.model.load_in_4bit and self.train.trainable == "full":
            raise ValueError("train.trainable: a 4-bit base cannot be trained in full; use tokens or mask")
        return self

    @property
    def resolved_output_dir(self) -> Path:
        import os

        run_id = os.environ.get("MLFLOW_RUN_ID") or "local"
        return Path(self.output_dir.replace("{preset}", self.preset or "run").replace("{run_id}", run_id))

    @property
    def active_plugins(self) -> tuple[str, ...]:
        """The plugins the run needs: the listed ones, the init method's, and base-row masking for `mask`."""
        needed = list(self.plugins)
        if self.vocab.lexicon is not None:
            needed.append(self.init.method)
        if self.train.trainable == "mask":
            needed.append("mask")
        return tuple(dict.fromkeys(needed))

    def flat(self) -> dict[str, Any]:
        """The config as `section.key: value` pairs, the form MLflow params and `--set` use."""
        return flatten(self.model_dump(mode="json"))


SECTIONS = {
    "model": ModelConfig,
    "vocab": VocabConfig,
    "data": DataConfig,
    "init": InitConfig,
    "train": TrainConfig,
    "tracking": TrackingConfig,
}

#: Short names accepted by `--set` and `--over`, for the keys people type most.
ALIASES = {
    "init": "init.method",
    "lr": "train.lr",
    "max_steps": "train.max_steps",
    "trainable": "train.trainable",
    "model": "model.name_or_path",
    "lexicon": "vocab.lexicon",
    "corpus": "data.corpus",
    "seq_len": "data.seq_len",
    "seed": "train.seed",
}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def all_keys() -> list[str]:
    """Every settable key, `section.key` form."""
    keys = [name for name in RunConfig.model_fields if name not in SECTIONS]
    for section, model in SECTIONS.items():
        keys.extend(f"{section}.{name}" for name in model.model_fields)
    return keys


def resolve_key(key: str) -> str:
    """The canonical `section.key` for a key or alias, or a ConfigError that lists near matches."""
    key = key.strip()
    if key in ALIASES:
        return ALIASES[key]
    known = all_keys()
    if key in known:
        return key
    leaf_matches = [k for k in known if k.rsplit(".", 1)[-1] == key]
    if len(leaf_matches) == 1:
        return leaf_matches[0]
    import difflib

    near = difflib.get_close_matches(key, known + list(ALIASES), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else "; `wakelab config-keys` lists them"
    raise ConfigError(f"unknown config key '{key}'{hint}")


def plugin_section(key: str) -> str | None:
    """The section a dotted key names outside the core sections (a plugin's, checked once the active ones are known)."""
    section = key.strip().split(".", 1)[0]
    return section if "." in key and section not in RunConfig.model_fields else None


def parse_value(text: str) -> Any:
    """A `--set` value: YAML scalars and lists (`1e-3`, `true`, `null`, `[a, b]`), else the string itself."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML reads 1e-3 as a string; numbers in scientific notation are what researchers type.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def set_in(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is a value, not a section")
    node[leaf] = value


def preset_names() -> list[str]:
    folder = resources.files("wakelab") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(preset_names())}")
    text = (resources.files("wakelab") / "presets" / f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, train:, ...)")
    return data


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(
    preset: str | None = "demo",
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | tuple[str, ...] = (),
    *,
    plugins: tuple[str, ...] | list[str] = (),
    cwd: Path | None = None,
) -> RunConfig:
    """Resolve preset -> file -> overrides into a validated RunConfig, with the active plugins' own sections.

    ``overrides`` is either ``["key=value", ...]`` as typed on the command line or a ``{key: value}`` dict.
    ``plugins`` are activated on top of the config's own list (``--plugin``); ``cwd`` is where ``./plugins`` is.
    """
    tree: dict[str, Any] = load_preset(preset) if preset else {}
    if config_file:
        tree = merge(tree, load_config_file(config_file))
    if preset:
        tree["preset"] = preset
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    else:
        pairs = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set '{item}' must be key=value, e.g. --set train.lr=1e-3")
            key, text = item.split("=", 1)
            pairs.append((key, parse_value(text)))
    explicit = set()
    for key, value in pairs:
        section = plugin_section(key)
        if section:
            explicit.add(section)  # a plugin's section: checked against the plugin once the active ones are known
            set_in(tree, key.strip(), value)
            continue
        set_in(tree, resolve_key(key), value)
    if plugins:
        listed = tree.get("plugins") or ()
        listed = [p.strip() for p in listed.split(",") if p.strip()] if isinstance(listed, str) else list(listed)
        tree["plugins"] = list(dict.fromkeys([*listed, *plugins]))
    return validate(tree, cwd=cwd, explicit=explicit)


def validate(
    tree: dict[str, Any],
    cwd: Path | None = None,
    explicit: set[str] | frozenset[str] = frozenset(),
    strict: bool = True,
) -> RunConfig:
    """A RunConfig from a nested mapping: the core sections, then the sections the active plugins declare.

    A section no active plugin declares is an error when it was set explicitly (``explicit``: it would be ignored)
    or when no plugin found declares it; one from a preset or file for a plugin that is found but not active is
    left out, so a preset's ``recorder:`` block does no harm when the recorder is switched off. ``strict=False``
    (reading a finished run back) skips plugins that are gone, and their sections.
    """
    from . import plugin_config

    core_tree = {k: v for k, v in tree.items() if k in RunConfig.model_fields}
    others = {k: v for k, v in tree.items() if k not in RunConfig.model_fields}
    core = _validated(RunConfig, core_tree, {})
    pm, sections = plugin_config.active_sections(
        core.active_plugins, cwd, optional=[core.init.method], reserved=RunConfig.model_fields, strict=strict
    )
    for name, value in others.items():
        if name in sections or not strict:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"unknown config key '{name}'{resolve_hint(name)}")
        owner = plugin_config.owner_of(name, cwd)
        if owner is None:
            raise ConfigError(
                f"unknown config key '{_first_key(name, value)}': neither wakelab nor any plugin found has a section "
                f"'{name}'; `wakelab config-keys` lists them all"
            )
        if name in explicit:
            raise ConfigError(
                f"config key '{_first_key(name, value)}' belongs to plugin '{owner}', which is not active, so it "
                f"would be ignored; activate it with --plugin {owner} (or list it under plugins:)"
            )
    config = core
    if sections:
        model = _with_sections(tuple(sorted((s.name, s.model) for s in sections.values())))
        full_tree = {**core_tree, **{k: v for k, v in others.items() if k in sections}}
        config = _validated(model, full_tree, {s.name: s.plugin for s in sections.values()})
    plugin_config.check(pm, config)
    return config


def _first_key(name: str, value: Any) -> str:
    return f"{name}.{next(iter(value))}" if isinstance(value, dict) and value else name


@functools.cache
def _with_sections(sections: tuple[tuple[str, type], ...]) -> type[RunConfig]:
    """RunConfig with the plugins' sections as fields (one class per set of sections, so configs compare equal)."""
    fields = {name: (model, model()) for name, model in sections}
    return create_model("RunConfig", __base__=RunConfig, __module__=__name__, **fields)


def _validated(model: type[RunConfig], tree: dict[str, Any], owners: dict[str, str]) -> RunConfig:
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, owners, model)) from None


def describe_validation_error(
    exc: ValidationError, owners: dict[str, str] | None = None, model: type[RunConfig] = RunConfig
) -> str:
    """One line per problem: the dotted key, what was given, and what is expected; a plugin's key names the plugin."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        given = err.get("input")
        owner = (owners or {}).get(str(err["loc"][0])) if err["loc"] else None
        prefix = f"plugin '{owner}': " if owner else ""
        if err["type"] == "extra_forbidden":
            near = _plugin_hint(model, key) if owner else resolve_hint(key)
            lines.append(f"{prefix}unknown config key '{key}'{near}")
            continue
        expected = err["msg"].removeprefix("Value error, ")
        if key:
            shown = json.dumps(given, default=str) if not isinstance(given, dict) else "a mapping"
            lines.append(f"{prefix}config key '{key}': got {shown}; {expected}")
        else:
            lines.append(expected)
    return "; ".join(lines)


def _plugin_hint(model: type[RunConfig], key: str) -> str:
    import difflib

    section, _, leaf = key.partition(".")
    known = list(model.model_fields[section].annotation.model_fields)
    near = difflib.get_close_matches(leaf, known, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(f'{section}.{n}' for n in near)}?" if near else f"; keys: {', '.join(known)}"


def resolve_hint(key: str) -> str:
    try:
        resolve_key(key.rsplit(".", 1)[-1])
    except ConfigError as exc:
        message = str(exc)
        return message[message.index(";") :] if ";" in message else ""
    return f"; did you mean '{resolve_key(key.rsplit('.', 1)[-1])}'?"


def reference_markdown() -> str:
    """The configuration reference, generated from the field definitions above and the built-in plugins' sections
    (docs/configuration.md)."""
    from .plugin_config import every_section

    out = [
        "# Configuration reference",
        "",
        "Generated from `wakelab.config` by `wakelab config-keys --markdown`; do not edit by hand.",
        "Set any key with `--set section.key=value`, in a `--config` YAML file, or in a preset.",
        "A plugin's section (`recorder`, `sentry`, ...) is used when that plugin is active.",
        "",
    ]
    top = {k: v for k, v in RunConfig.model_fields.items() if k not in SECTIONS}
    out += ["## (top level)", "", "| key | default | description |", "| --- | --- | --- |"]
    out += [f"| `{k}` | `{_default(v)}` | {v.description} |" for k, v in top.items()]
    plugin_sections = {s.name: s for s in every_section(None, origins={"built-in"}).values()}
    for section, model in {**SECTIONS, **{n: s.model for n, s in sorted(plugin_sections.items())}}.items():
        owner = f" (plugin `{plugin_sections[section].plugin}`)" if section in plugin_sections else ""
        out += ["", f"## {section}{owner}", "", (model.__doc__ or "").strip(), ""]
        out += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            kind = _type_name(field.annotation)
            out.append(f"| `{section}.{name}` | {kind} | `{_default(field)}` | {field.description} |")
    out += ["", "## Short names", "", "| short | key |", "| --- | --- |"]
    out += [f"| `{a}` | `{k}` |" for a, k in ALIASES.items()]
    return "\n".join(out) + "\n"


def _default(field: Any) -> str:
    value = field.default
    return "null" if value is None else json.dumps(value) if not isinstance(value, str) else value


def _type_name(annotation: Any) -> str:
    import typing

    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in typing.get_args(annotation))
    text = str(annotation).replace("typing.", "")
    if text.startswith("<class '"):
        text = text[8:-2]
    return text.replace(" | ", " or ")
