"""Taking a trained vocabulary out of wakelab: a transformers folder, a PEFT adapter, or a full MLflow model.

Each loads with the ecosystem's own calls and no wakelab code: ``AutoModelForCausalLM.from_pretrained(DIR)``,
``PeftModel.from_pretrained(resized_base, DIR)``, ``mlflow.transformers.load_model(uri)``. Everything that can be
wrong with the source (an unfinished run, a moved or different base, a taken destination) is found before anything
is written, and a folder is written next to its destination and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import model as model_mod
from ..config import RunConfig, validate
from ..data.corpus import resolve_lexicon
from ..errors import WakelabError
from ..run.merge import BASE_INFO_FILE, TrainedRows, base_source, check_base, finished_rows, merged_model, prepared_base
from ..run.state import resolve_run
from ..storage.checkpoints import CheckpointError, latest_checkpoint, publish_dir, verify
from ..storage.writepoint import write_point
from ..vocab import expand_from_lexicon

FORMATS = ("hf", "peft")
#: Provenance written into every exported folder (which run, step and base it came from).
EXPORT_INFO_FILE = "wakelab_export.json"
UNFINISHED = ("FAILED", "KILLED", "RUNNING", "SCHEDULED")


class ExportError(WakelabError):
    """A run or destination that cannot be exported as asked."""


@dataclass
class ExportSource:
    """A run's trained state, found: its config, rows file, the base it fits, and how it was chosen."""

    run_dir: Path
    run_id: str | None
    config: RunConfig
    rows_path: Path
    step: int | None
    base: dict[str, Any]
    saved_tokenizer: Path | None
    notes: list[str] = field(default_factory=list)

    def rows(self) -> TrainedRows:
        return TrainedRows.read(self.rows_path, self.base)


def _run_status(run_id: str | None) -> str | None:
    if run_id is None:
        return None
    try:
        from ..tracking.runs import mlflow_client, quiet_retries

        with quiet_retries():
            return mlflow_client().get_run(run_id).info.status
    except Exception:  # noqa: BLE001 - the store is optional here: the files decide
        return None


def find_source(target: str) -> ExportSource:
    """The state to export from a run directory, an MLflow run id, or a complete ``checkpoint-N`` folder.

    A finished run gives its final rows, and so does one that ended FAILED after writing them (a plugin's
    end-of-run work failed: ``final/finished.json`` says the rows are complete); a FAILED, KILLED or still-running
    run (or one without final rows) its latest complete checkpoint, and a note saying so.
    """
    run_dir, run_id = resolve_run(target)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ExportError(
            f"{run_dir} is not a wakelab run directory (no config.yaml); give a run's output_dir, an "
            "MLflow run id or a checkpoint-N folder"
        )
    config = validate(yaml.safe_load(config_path.read_text(encoding="utf-8")))
    if config.train.trainable == "full":
        raise ExportError(
            "train.trainable=full trains every weight: its checkpoint-N folders are transformers "
            "folders already (from_pretrained on one); export handles the new-rows strategies"
        )
    given = Path(target)
    notes: list[str] = []
    if given.is_dir() and (given / "manifest.json").exists():
        manifest = verify(given)
        return ExportSource(
            run_dir,
            run_id,
            config,
            given / "trained_rows.safetensors",
            manifest.get("step"),
            manifest,
            given if (given / "tokenizer_config.json").exists() else None,
            notes,
        )
    status = _run_status(run_id)
    final = run_dir / "final" / "new_rows.safetensors"
    finished_anyway = status in UNFINISHED and final.exists() and finished_rows(final.parent, run_id) is not None
    if finished_anyway:  # trained to the end, final rows written; only end-of-run work after them failed
        notes.append(f"run {run_id or run_dir} ended {status} after its final rows were written: exporting them")
    if final.exists() and (status not in UNFINISHED or finished_anyway):
        base_file = final.parent / BASE_INFO_FILE
        base = json.loads(base_file.read_text()) if base_file.exists() else {}
        tokenizer = final.parent / "tokenizer"
        return ExportSource(
            run_dir, run_id, config, final, None, base, tokenizer if tokenizer.is_dir() else None, notes
        )
    why = f"run {run_id or run_dir} ended {status}" if status in UNFINISHED else f"{run_dir} has no final rows"
    try:
        checkpoint = latest_checkpoint(run_dir)
    except CheckpointError:
        raise ExportError(
            f"{why} and left no complete checkpoint: nothing trained to export (train it again, "
            "with train.save_steps to keep checkpoints)"
        ) from None
    manifest = verify(checkpoint)
    notes.append(f"{why}: exporting its latest complete checkpoint, {checkpoint.name}")
    return ExportSource(
        run_dir,
        run_id,
        config,
        checkpoint / "trained_rows.safetensors",
        manifest.get("step"),
        manifest,
        checkpoint if (checkpoint / "tokenizer_config.json").exists() else None,
        notes,
    )


def expanded_tokenizer(source: ExportSource, base_path: str):
    """The run's expanded tokenizer, rebuilt from the base and the lexicon the way the run built it (so it decodes
    with the current fixes), or the one the run saved when the lexicon is gone."""
    config = source.config
    lexicon = resolve_lexicon(config)
    tok_source = model_mod.tokenizer_source(config.model) or base_path
    if lexicon is not None and Path(lexicon).is_file():
        tokenizer = model_mod.load_tokenizer(tok_source, config.model.revision)
        num_base = len(tokenizer)
        check_base(source.base, num_base, None, base_path)
        expand_from_lexicon(tokenizer, config.vocab, lexicon)
        return tokenizer
    if source.saved_tokenizer is not None:
        source.notes.append(
            f"lexicon {lexicon} not found: using the tokenizer the run saved ({source.saved_tokenizer})"
        )
        return model_mod.load_tokenizer(str(source.saved_tokenizer))
    raise ExportError(
        f"cannot rebuild the run's tokenizer: lexicon {lexicon} is gone and the run saved no tokenizer; "
        "put the lexicon back (vocab.lexicon in the run's config.yaml)"
    )


def check_destination(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"--to {dest} is a file; give a folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ExportError(
            f"--to {dest} exists and is not empty; pass --overwrite to replace it, or choose another folder"
        )


def _staging(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".partial-{dest.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def provenance(source: ExportSource, fmt: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from .. import __version__

    base = {
        k: source.base.get(k)
        for k in ("base_model", "revision", "num_base", "vocab_size", "base_checksum")
        if source.base.get(k) is not None
    }
    return {
        "format": fmt,
        "run_id": source.run_id,
        "run_dir": str(source.run_dir.resolve()),
        "rows": str(source.rows_path.resolve()),
        "step": source.step,
        "base": base,
        "add_as": source.config.vocab.add_as,
        "wakelab_version": __version__,
        **(extra or {}),
    }


@dataclass
class ExportResult:
    dest: Path | str
    fmt: str
    notes: list[str]
    new_tokens: int
    vocab_size: int


def export(
    target: str,
    dest: str | None,
    fmt: str = "hf",
    *,
    overwrite: bool = False,
    base: str | None = None,
    quantized: bool = False,
    registered_model_name: str | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> ExportResult:
    """Export ``target`` (run dir, MLflow run id or checkpoint) to ``dest`` as ``fmt`` (``hf``, ``peft``), or to
    MLflow as a full transformers model when ``dest`` is ``mlflow``."""
    to_mlflow = dest == "mlflow"
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    if quantized and fmt != "hf":
        raise ExportError("--quantized applies to --format hf (a PEFT adapter holds only the new rows)")
    if not dest:
        raise ExportError("give the destination: --to DIR (a new or empty folder) or --to mlflow")
    if registered_model_name and not to_mlflow:
        raise ExportError("--registered-model-name registers an MLflow model: use it with --to mlflow")
    out = None if to_mlflow else Path(dest)
    if out is not None:
        check_destination(out, overwrite)
    source = find_source(target)
    if quantized and not source.config.model.load_in_4bit:
        raise ExportError(
            "--quantized keeps a 4-bit base 4-bit, but this run's base is not 4-bit "
            f"(model.dtype={source.config.model.dtype}); drop --quantized"
        )
    base_path = base_source(source.config, base)
    trained = source.rows()
    tokenizer = expanded_tokenizer(source, base_path)
    if source.config.model.load_in_4bit and not quantized:
        source.notes.append(
            f"the run's base is 4-bit nf4: exported unquantized in its compute dtype "
            f"({source.config.model.compute_dtype}); --quantized keeps it 4-bit"
        )
    for note in source.notes:
        say(note)
    new_tokens = int((trained.token_ids >= int(trained.base.get("num_base", 0) or 0)).sum())
    if fmt == "peft" and not to_mlflow:
        model = prepared_base(source.config, trained, tokenizer, source=base_path)
        _publish(
            out, lambda folder: write_peft(model, trained, tokenizer, folder, base_path, provenance(source, "peft"))
        )
        return ExportResult(out, fmt, source.notes, new_tokens, len(tokenizer))
    model = merged_model(source.config, trained, tokenizer, source=base_path, quantized=quantized)
    if to_mlflow:
        from ..run.logged_model import log_full_model

        with write_point(
            "export-mlflow",
            "the MLflow artifact store",
            what="the logged model",
            intact="the run's files are untouched",
            then=f"wakelab export {target} --to mlflow",
        ):
            uri = log_full_model(
                model,
                tokenizer,
                source.run_id,
                registered_model_name=registered_model_name,
                params=provenance(source, "mlflow"),
            )
        return ExportResult(uri, "mlflow", source.notes, new_tokens, len(tokenizer))
    _publish(out, lambda folder: write_hf(model, tokenizer, folder, provenance(source, "hf", {"quantized": quantized})))
    return ExportResult(out, fmt, source.notes, new_tokens, len(tokenizer))


def _publish(dest: Path, write: Callable[[Path], None]) -> None:
    """Write into a private folder, then rename it to ``dest``: a full disk half-way leaves ``dest`` as it was."""
    with write_point(
        "export",
        dest,
        intact=f"the run's files are untouched and {dest} is as it was (nothing half-written was published)",
        then=f"the same wakelab export command again (to {dest})",
    ):
        staging = _staging(dest)
        try:
            write(staging)
            publish_dir(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def write_hf(model, tokenizer, folder: Path, info: dict[str, Any]) -> None:
    """A standard transformers folder: config (expanded vocabulary), safetensors weights, tokenizer, generation
    config."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def write_peft(model, trained: TrainedRows, tokenizer, folder: Path, base_path: str, info: dict[str, Any]) -> None:
    """A PEFT TrainableTokens adapter over the new token ids (the tied head follows the embedding; an untied head
    gets its own delta), plus the expanded tokenizer."""
    import torch
    from peft import TrainableTokensConfig, get_peft_model

    ids = trained.token_ids.tolist()
    tied = getattr(model.config, "tie_word_embeddings", False) or model.get_output_embeddings() is None
    embed_name = _module_name(model, model.get_input_embeddings())
    targets = [embed_name]
    if not tied and trained.head_rows is not None:
        targets.append(_module_name(model, model.get_output_embeddings()))
    config = TrainableTokensConfig(target_modules=targets, token_indices=ids, base_model_name_or_path=base_path)
    with warnings.catch_warnings():
        # PEFT warns that it cannot tie adapters in general; TrainableTokens ties the head to the embedding's delta.
        warnings.filterwarnings("ignore", message=".*tied layer is part of the adapter.*")
        peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            delta = getattr(module, "trainable_tokens_delta", None)
            if delta is None or "default" not in delta or module.tied_adapter is not None:
                continue
            values = trained.head_rows if name.endswith(targets[-1]) and len(targets) > 1 else trained.rows
            delta["default"].copy_(values.to(delta["default"].dtype))
    # Only the deltas: the user resizes the base (README), so the resized matrix need not travel with the adapter.
    peft_model.save_pretrained(folder, save_embedding_layers=False)
    tokenizer.save_pretrained(folder)
    (folder / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)
