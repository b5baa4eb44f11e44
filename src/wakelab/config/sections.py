"""The run config's sections: every setting with its default, unit and validation beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
            "chunk x vocab fp32); None: transformers' own loss over full logits. A training batch whose whole "
            "logits hold under 2**24 values (64 MiB fp32) takes transformers' loss: there chunking saves no memory."
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
    ``validate`` (see ``wakelab.hooks.sections``), so ``config.recorder`` reads like a core section.
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
            from ..precision import trained_dtype_problem

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
