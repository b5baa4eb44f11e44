"""Loading a trained state back: a run's final rows or a checkpoint's, on top of the base model they came from.

The analyses and anything else that looks at a finished run use this, so a run directory, a checkpoint and an
MLflow run id all lead to the same (model, tokenizer, rows, config).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..config import RunConfig, validate
from ..errors import WakelabError
from ..rows import RowAccess, setup_trainable_rows
from ..storage.checkpoints import CheckpointError, latest_checkpoint, verify

ROWS_FILES = ("trained_rows.safetensors", "new_rows.safetensors")


@dataclass
class TrainedState:
    config: RunConfig
    model: torch.nn.Module
    tokenizer: object
    rows: RowAccess
    source: Path
    step: int | None
    run_id: str | None


def resolve_run(target: str) -> tuple[Path, str | None]:
    """A run's output directory (and run id) from a directory, a checkpoint, or an MLflow run id."""
    path = Path(target)
    if path.exists():
        run_dir = path.parent if (path / "manifest.json").exists() or path.name == "final" else path
        info = run_dir / "wakelab_run.json"
        run_id = None
        if info.exists():
            import json

            run_id = json.loads(info.read_text()).get("run_id")
        return run_dir, run_id
    from mlflow.exceptions import MlflowException

    from ..tracking.runs import mlflow_client

    try:
        run = mlflow_client().get_run(target)
    except MlflowException:
        raise WakelabError(f"'{target}' is neither a folder nor an MLflow run id in the tracking store") from None
    output_dir = run.data.tags.get("wakelab.output_dir")
    if not output_dir or not Path(output_dir).exists():
        raise WakelabError(f"run {target} has no local output directory (tag wakelab.output_dir) to read its rows from")
    return Path(output_dir), target


def resolve_checkpoint(spec: str) -> Path:
    """A checkpoint from a checkpoint folder, a run directory (its latest), an MLflow run id, or ``latest:PRESET``
    (the latest checkpoint of the newest finished run of that preset in the tracking store)."""
    path = Path(spec)
    if path.exists():
        return path if (path / "manifest.json").exists() else latest_checkpoint(path)
    if spec.startswith("latest:"):
        from ..tracking.runs import mlflow_client

        preset = spec.split(":", 1)[1]
        client = mlflow_client()
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(
            experiments,
            f"tags.`wakelab.preset` = '{preset}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs:
            raise WakelabError(
                f"no finished '{preset}' run in the tracking store to continue from; run it first "
                f"(wakelab run --preset {preset}) or give a checkpoint path"
            )
        spec = runs[0].info.run_id
    run_dir, _ = resolve_run(spec)
    return latest_checkpoint(run_dir)


def rows_file(target: Path) -> tuple[Path, int | None]:
    """Where the trained rows of ``target`` are: a checkpoint's, a run's final ones, or its latest checkpoint's."""
    if (target / "manifest.json").exists():
        manifest = verify(target)
        return target / "trained_rows.safetensors", manifest.get("step")
    for candidate in (target / "final" / "new_rows.safetensors", target / "new_rows.safetensors"):
        if candidate.exists():
            return candidate, None
    try:
        checkpoint = latest_checkpoint(target)
    except CheckpointError:
        raise WakelabError(
            f"{target} holds no trained rows (no final/new_rows.safetensors and no checkpoint)"
        ) from None
    return checkpoint / "trained_rows.safetensors", verify(checkpoint).get("step")


def _reading_strategy(config: RunConfig, model) -> str:
    """How a loaded run holds its rows: one embedding matrix where it loses nothing.

    ``tokens`` trains a split head that computes the logits as two products (base rows, new rows); one product over
    the whole matrix rounds differently in the last bit. Read back into one matrix, as an export holds it, the model
    that analysis and generation use gives logits bit-identical to the exported model's. Rows held in another dtype
    than the model's keep the split, so they are read at the precision they trained in.
    """
    strategy = config.train.trainable
    if strategy == "tokens":
        held = model.get_input_embeddings().weight.dtype
        if config.train.rows_dtype in ("auto", str(held).removeprefix("torch.")):
            return "mask"
    return strategy


def load_trained(target: str | Path, *, initial: bool = False) -> TrainedState:
    """The model with the trained rows in place (or, ``initial=True``, as the run started: after init)."""
    from safetensors.torch import load_file

    from .. import model as model_mod
    from .build import INITIAL_ROWS, expand_for_config

    run_dir, run_id = resolve_run(str(target))
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise WakelabError(f"{run_dir} is not a wakelab run directory (no config.yaml)")
    config = validate(yaml.safe_load(config_path.read_text()), strict=False)
    source_path = Path(target) if Path(target).exists() else run_dir
    saved_initial = run_dir / INITIAL_ROWS
    model, tokenizer, num_base, base_rows = expand_for_config(
        config, initial_rows=saved_initial if saved_initial.exists() else None
    )
    strategy = _reading_strategy(config, model)
    rows = setup_trainable_rows(model, num_base, strategy, config.train.rows_dtype, base_rows)
    del base_rows  # the split holds what it needs
    step = 0
    if not initial:
        path, step = rows_file(source_path)
        saved = load_file(str(path))
        rows.load_rows(saved["token_ids"], saved["rows"])
        if "head_rows" in saved:  # an untied head's own new rows
            from .merge import load_head_rows

            load_head_rows(model, saved["token_ids"].long(), saved["head_rows"])
        if config.train.trainable == "full" and path.name == "trained_rows.safetensors":
            raise WakelabError("full-model checkpoints are read with transformers' from_pretrained on the folder")
    model.eval()
    del model_mod
    return TrainedState(config, model, tokenizer, rows, source_path, step, run_id)
