"""The small typed objects the engine hands to hooks: all a plugin may see of a run.

Each field is documented here and only here (``field(metadata={"doc": ...})``): ``help(wakelab.StepState)`` shows
it, the hook specifications point to it, and ``wakelab plugins --contexts-markdown`` turns it into the plugin
guide's reference (docs/contexts.md), so the three never drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..logs import is_main_process, log
from ..rows import RowAccess

_MAIN = (
    "True in the one process that speaks for the run: always in a single process, rank 0 under torchrun. Write "
    "files and log to MLflow only when it is True (like TrainerState's `is_world_process_zero`); never read `RANK`."
)


def _field(doc: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation attached (``metadata["doc"]``)."""
    return dataclasses.field(metadata={"doc": doc}, **kwargs)


def _main_field() -> Any:
    return _field(_MAIN, default_factory=is_main_process)


def _documented(cls: type) -> type:
    """Append the fields' docs to the class docstring, so ``help()`` and IDEs show them too."""
    lines = [f"    {f.name}: {f.metadata['doc']}" for f in dataclasses.fields(cls)]
    cls.__doc__ = f"{cls.__doc__}\n\n    Fields:\n" + "\n".join(lines) + "\n"
    return cls


@_documented
@dataclasses.dataclass
class InputsContext:
    """A run's inputs, loaded and checked by wakelab, before its directory or MLflow run exists (``check_inputs``)."""

    config: RunConfig = _field("The resolved config; a plugin reads its own section as `config.<section>`.")
    model_config: Any = _field(
        "The base model's transformers config (what `AutoConfig` loads, or what `model.architecture` builds): its "
        "layers (`num_hidden_layers`), width (`hidden_size`) and context (`max_position_embeddings`). No weights "
        "are loaded yet."
    )
    tokenizer: Any = _field("The expanded tokenizer (base vocabulary plus the new tokens).")
    num_base: int = _field("Rows of the base vocabulary: ids below it are base tokens.")
    new_ids: torch.Tensor = _field("Ids of the tokens the lexicon adds (1-D, long; empty without a lexicon).")
    new_words: list[str] = _field("The added tokens' words, in the order of `new_ids`.")
    corpus_ids: Any = _field(
        "The run's training text as token ids of the expanded tokenizer (a 1-D numpy array: the span an init's "
        "`corpus_ids()` returns), or None when there is no corpus."
    )
    is_main_process: bool = _main_field()


@_documented
@dataclasses.dataclass
class InitContext:
    """What an ``init_embeddings`` plugin needs to fill the new rows."""

    method: str = _field("The initialiser the config asks for (`init.method`): answer only when it is your name.")
    weight: torch.Tensor = _field(
        "The full `[vocab, d]` input embedding matrix, writable (no grad): fill "
        "`weight[new_ids]` in place; base rows must not change."
    )
    num_base: int = _field("Rows of the base vocabulary: ids below it are base tokens.")
    new_ids: torch.Tensor = _field("Ids of the added tokens (1-D, long).")
    new_words: list[str] = _field("The added tokens' words, in the order of `new_ids`.")
    tokenizer: Any = _field("The expanded tokenizer (base vocabulary plus the new tokens).")
    options: dict[str, Any] = _field("The `init` config section as a dict (`scale`, `seed`, `constituents`, ...).")
    generator: torch.Generator = _field("A generator seeded from `init.seed`: draw from it for reproducible rows.")
    base_tokenizer: Any = _field(
        "The tokenizer before expansion (to split a new word into base pieces), or None.", default=None
    )
    log: Callable[[str], None] = _field("Say what the init did: one line on stderr (`wakelab.log`).", default=log)
    model: torch.nn.Module | None = _field(
        "The base model with the grown vocabulary (eval mode; the new rows as resized), for an init that reads "
        "with it; leave its parameters as they are. None when the caller has none.",
        default=None,
    )
    corpus_ids: Callable[[], Any] | None = _field(
        "Returns the run's training text as token ids of the expanded tokenizer (a 1-D integer array; read on "
        "first call), for an init that learns from how the new words are used. None when there is no corpus.",
        default=None,
    )
    config: RunConfig | None = _field(
        "The resolved config; an init plugin reads its own section as `config.<section>`.", default=None
    )
    log_metrics: Callable[[dict[str, float], int], None] = _field(
        "Log metrics at a step to the run's MLflow run (an init's own curve, under an `init/` prefix).",
        default=lambda metrics, step: None,
    )
    progress: bool = _field("Whether a progress bar may be shown (off with `--no-progress`).", default=False)
    report: dict[str, Any] = _field(
        "Entries for the vocabulary report's `init` section (e.g. which words an init could not serve).",
        default_factory=dict,
    )
    is_main_process: bool = _main_field()


@_documented
@dataclasses.dataclass
class GradContext:
    """Gradients are ready; clipping and the optimizer step come next."""

    step: int = _field("The optimizer step about to happen (1 for the first).")
    rows: RowAccess = _field(
        "The trainable rows (`RowAccess`): `rows.grad_matrix()` is the gradient to edit in "
        "place; `rows.strategy`, `rows.num_base`, `rows.new_ids`."
    )
    model: torch.nn.Module = _field("The model being trained (its parameters hold this step's gradients).")
    is_main_process: bool = _main_field()


@_documented
@dataclasses.dataclass
class StepState:
    """The run right after an optimizer step (and the learning-rate scheduler). Read only."""

    step: int = _field("Optimizer steps done, this one included.")
    loss: float = _field("This step's mean training loss (over its micro-batches).")
    lr: float = _field("The learning rate this step used.")
    logits: torch.Tensor | None = _field(
        "Last-position logits of the first sequence of the step's last micro-batch (detached, float32), or None."
    )
    model: torch.nn.Module = _field("The model being trained; do not modify it here.")
    optimizer: torch.optim.Optimizer | None = _field("The optimizer (for its state); do not step or change it.")
    rows: RowAccess = _field(
        "Values, gradients and Adam state of any rows, whatever holds them; `rows.grads()` "
        "gives the gradient this step's update used (after masking and clipping)."
    )
    is_main_process: bool = _main_field()


@_documented
@dataclasses.dataclass
class SaveContext:
    """A checkpoint that is complete on disk (``on_save`` runs in the main process only)."""

    checkpoint_dir: Path = _field(
        "The complete checkpoint (its manifest is written): copy or read it, never modify it."
    )
    step: int = _field("The optimizer step the checkpoint holds.")
    output_dir: Path = _field("The run's directory.")
    run_id: str | None = _field("The MLflow run's id.")
    is_main_process: bool = _main_field()


@_documented
@dataclasses.dataclass
class RunContext:
    """The run, as plugins see it at start and end (the same object for ``on_run_start`` and ``on_run_end``)."""

    config: RunConfig = _field("The resolved config; a plugin reads its own section as `config.<section>`.")
    output_dir: Path = _field("The run's directory.")
    run_id: str | None = _field("The MLflow run's id.")
    model: torch.nn.Module = _field("The model, with the vocabulary expanded and the trainable rows set up.")
    tokenizer: Any = _field("The expanded tokenizer.")
    rows: RowAccess = _field("The rows (`RowAccess`): values, gradients and optimizer state of any rows.")
    start_step: int = _field("0, or the checkpoint's step when resuming (set before `on_run_start`).", default=0)
    optimizer: torch.optim.Optimizer | None = _field(
        "Trainer's optimizer (set before `on_run_start`; None in a context built outside a run).", default=None
    )
    corpus_ids: Any = _field(
        "The training corpus as token ids (numpy), e.g. to tell trained from untrained tokens.", default=None
    )
    log_artifact: Callable[[str | Path, str | None], None] = _field(
        "`log_artifact(path, artifact_path=None)`: a file or folder into the MLflow run (a no-op in the other "
        "processes).",
        default=lambda path, artifact_path=None: None,
    )
    log_params: Callable[[dict[str, Any]], None] = _field(
        "`log_params({name: value})`: MLflow params (a no-op in the other processes).", default=lambda params: None
    )
    log_metrics: Callable[[dict[str, float], int], None] = _field(
        "`log_metrics({name: value}, step)`: MLflow metrics (a no-op in the other processes).",
        default=lambda metrics, step: None,
    )
    set_tags: Callable[[dict[str, str]], None] = _field(
        "`set_tags({name: value})`: MLflow tags (a no-op in the other processes).", default=lambda tags: None
    )
    is_main_process: bool = _main_field()


#: The contexts in the order the hooks meet them.
CONTEXTS = (InputsContext, InitContext, GradContext, StepState, SaveContext, RunContext)
