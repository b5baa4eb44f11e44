"""The trained rows put back into a plain transformers model: the base loaded as it is, its vocabulary resized, the
new rows written into the one embedding matrix (and into the head when it is not tied).

Training splits the matrix into frozen base rows and a small trainable block (:mod:`wakelab.rows`); nothing outside
wakelab knows those modules. Export, generation and the logged model all start from here, so a model that leaves
wakelab is an ordinary ``PreTrainedModel`` whose logits equal the ones wakelab computed.

The base is identified by its name, revision, vocabulary size and a checksum of its embedding rows (the rows the
new ones sit next to): a base that changed since the run is refused rather than merged into silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import model as model_mod
from ..config import RunConfig
from ..errors import ModelError, WakelabError
from ..storage.writepoint import published_file

#: Written next to a run's final rows: which base the rows belong to.
BASE_INFO_FILE = "base.json"
#: Written last by a run's finish phase: the final rows and the logged model are complete, whatever happens after
#: (a plugin's end-of-run work that fails marks the run FAILED, but its trained rows are still the run's result).
FINISHED_FILE = "finished.json"


def embedding_checksum(model, num_base: int) -> str:
    """sha256 of the base rows of the input embedding, in the dtype they are held in (cheap: one matrix)."""
    weight = model.get_input_embeddings().weight[:num_base].detach().cpu().contiguous()
    return hashlib.sha256(weight.view(torch.uint8).numpy().tobytes()).hexdigest()


def is_tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is None or head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def head_rows(model, ids: torch.Tensor) -> torch.Tensor | None:
    """The output head's rows for ``ids`` when the head is its own matrix (None when tied to the embedding)."""
    if getattr(model.config, "tie_word_embeddings", False) or model.get_output_embeddings() is None:
        return None
    weight = model.get_output_embeddings().weight
    return weight.detach().index_select(0, ids.to(weight.device)).contiguous().cpu()


def write_finished(folder: Path, run_id: str | None, step: int) -> Path:
    """Mark ``folder``'s final rows complete: training reached ``step`` and every final file was written."""
    path = folder / FINISHED_FILE
    with published_file(path) as tmp:  # whole or absent: a half-written mark would claim rows it cannot vouch for
        tmp.write_text(json.dumps({"run_id": run_id, "step": int(step)}) + "\n", encoding="utf-8")
    return path


def finished_rows(folder: Path, run_id: str | None) -> dict[str, Any] | None:
    """The finish mark of ``folder`` when it belongs to ``run_id`` (any run when None), else None."""
    try:
        mark = json.loads((folder / FINISHED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(mark, dict) or (run_id is not None and mark.get("run_id") != run_id):
        return None
    return mark


def write_base_info(folder: Path, info: dict[str, Any]) -> Path:
    path = folder / BASE_INFO_FILE
    with published_file(path) as tmp:  # whole or absent, on a full disk too
        tmp.write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    return path


@dataclass
class TrainedRows:
    """What a run or checkpoint holds of the training: the rows, their token ids, and which base they fit."""

    token_ids: torch.Tensor
    rows: torch.Tensor
    head_rows: torch.Tensor | None
    base: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path, base: dict[str, Any]) -> TrainedRows:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            meta = dict(handle.metadata() or {})
            ids, rows = handle.get_tensor("token_ids"), handle.get_tensor("rows")
            head = handle.get_tensor("head_rows") if "head_rows" in keys else None
        info = dict(base)
        if "num_base" not in info and "num_base" in meta:
            info["num_base"] = int(meta["num_base"])
        return cls(ids.long(), rows, head, info)


def export_model_config(config: RunConfig, quantized: bool = False):
    """The run's model section as an export loads it: a 4-bit base in its compute dtype unless ``quantized``."""
    if config.model.load_in_4bit and not quantized:
        return config.model.model_copy(update={"load_in_4bit": False, "dtype": config.model.compute_dtype})
    return config.model


def base_source(config: RunConfig, override: str | None = None) -> str:
    """Where the base loads from; a local folder that is gone is one line naming it and the fix."""
    if override is not None:
        if not Path(override).expanduser().is_dir():
            raise ModelError(f"--base {override}: no such folder (give the base model's folder)")
        return override
    name = config.model.name_or_path
    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if config.model.architecture is None and not config.model.from_config and looks_local:
        if not Path(name).expanduser().is_dir():
            raise ModelError(
                f"the run's base model is no longer at {name} (model.name_or_path); put it back there or pass "
                "--base DIR with the same model"
            )
    return model_mod.model_source(config.model, config.train.seed)


def check_base(base: dict[str, Any], num_base: int, checksum: str | None, source: str) -> None:
    """Refuse a base whose vocabulary or embedding rows differ from the ones the run trained against."""
    recorded = base.get("num_base")
    if recorded is not None and int(recorded) != num_base:
        raise ModelError(
            f"the base at {source} has {num_base:,} tokens but the run was trained on one with {int(recorded):,}; "
            "it is another model: point --base at the one the run used"
        )
    expected = base.get("base_checksum")
    if expected and checksum and expected != checksum:
        raise ModelError(
            f"the base at {source} is not the one the run was trained on (embedding checksum {checksum[:12]} != "
            f"recorded {expected[:12]}); point --base at the exact model (and revision) the run used"
        )


def prepared_base(config: RunConfig, trained: TrainedRows, tokenizer, *, source: str, quantized: bool = False):
    """The base, checked against what the run recorded and resized to the expanded vocabulary (no rows written)."""
    model = model_mod.load_model(export_model_config(config, quantized), source)
    rows_in_base = model.get_input_embeddings().weight.shape[0]
    num_base = int(trained.base.get("num_base") or rows_in_base)
    if rows_in_base < num_base:
        raise ModelError(f"the base at {source} has {rows_in_base:,} embedding rows, fewer than the run's {num_base:,}")
    check_base(trained.base, num_base, embedding_checksum(model, num_base), source)
    new = int((trained.token_ids >= num_base).sum())
    if len(tokenizer) != num_base + new:
        raise WakelabError(
            f"the expanded tokenizer has {len(tokenizer):,} tokens, but the run's rows cover {num_base:,} base + "
            f"{new:,} new ones; it belongs to another run"
        )
    model_mod.expand_embeddings(model, len(tokenizer))
    model.eval()
    return model


def merged_model(config: RunConfig, trained: TrainedRows, tokenizer, *, source: str, quantized: bool = False):
    """The base with the expanded vocabulary and the trained rows in place, as a plain transformers model."""
    model = prepared_base(config, trained, tokenizer, source=source, quantized=quantized)
    write_rows(model, trained)
    return model


def write_rows(model, trained: TrainedRows) -> None:
    """The trained rows into the embedding matrix, and into an untied head (its own rows, or a copy when the run
    saved none: runs before head rows were saved trained the embedding only)."""
    embedding = model.get_input_embeddings().weight
    ids = trained.token_ids.to(embedding.device)
    with torch.no_grad():
        embedding[ids] = trained.rows.to(embedding.device, embedding.dtype)
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != embedding.data_ptr():
            if trained.head_rows is not None:
                head.weight[ids] = trained.head_rows.to(head.weight.device, head.weight.dtype)


def load_head_rows(model, ids: torch.Tensor, values: torch.Tensor) -> None:
    """Put saved head rows back into an untied head: a plain Linear, or wakelab's split head (new rows only)."""
    head = model.get_output_embeddings()
    if head is None:
        return
    with torch.no_grad():
        split = getattr(head, "_weights", None)
        if split is not None:
            base, new = split
            if new.data_ptr() == model.get_input_embeddings().new_weight.data_ptr():
                return  # tied: the embedding's rows are the head's
            new[(ids - base.shape[0]).to(new.device)] = values.to(new.device, new.dtype)
        elif head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            head.weight[ids.to(head.weight.device)] = values.to(head.weight.device, head.weight.dtype)
