"""The small typed objects the engine hands to hooks: all a plugin may see of a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .config import RunConfig
from .rows import RowAccess


@dataclass
class InitContext:
    """What an ``init_embeddings`` plugin needs to fill the new rows."""

    method: str
    weight: torch.Tensor
    num_base: int
    new_ids: torch.Tensor
    new_words: list[str]
    tokenizer: Any
    options: dict[str, Any]
    generator: torch.Generator
    base_tokenizer: Any = None
    log: Callable[[str], None] = print


@dataclass
class GradContext:
    """Gradients are ready; clipping and the optimizer step come next."""

    step: int
    rows: RowAccess
    model: torch.nn.Module


@dataclass
class StepState:
    """The run right after an optimizer step."""

    step: int
    loss: float
    lr: float
    logits: torch.Tensor | None
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    rows: RowAccess


@dataclass
class SaveContext:
    """A checkpoint that is complete on disk."""

    checkpoint_dir: Path
    step: int
    output_dir: Path
    run_id: str | None


@dataclass
class RunContext:
    """The run, as plugins see it at start and end."""

    config: RunConfig
    output_dir: Path
    run_id: str | None
    model: torch.nn.Module
    tokenizer: Any
    rows: RowAccess
    start_step: int = 0
    optimizer: torch.optim.Optimizer | None = None
    corpus_ids: Any = None  # the training corpus as token ids (numpy), e.g. to tell trained from untrained tokens
    log_artifact: Callable[[str | Path, str | None], None] = lambda path, artifact_path=None: None
    log_params: Callable[[dict[str, Any]], None] = lambda params: None
    log_metrics: Callable[[dict[str, float], int], None] = lambda metrics, step: None
    set_tags: Callable[[dict[str, str]], None] = lambda tags: None
