"""A run's result as an MLflow 3 logged model, linked to the run (the Models tab, ``search_logged_models``).

By default (``tracking.log_model=delta``) the logged model holds what the run changed and nothing the base already
has: the new rows with their token ids, the expanded tokenizer, and the base's name, revision, vocabulary size and
embedding checksum. Megabytes, not the gigabytes of the base. ``full`` (and ``wakelab export RUN --to mlflow``) logs
the whole merged model in MLflow's transformers flavour instead, so ``mlflow.transformers.load_model``, pyfunc and
the model registry work on it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import model as model_mod
from ..config import RunConfig
from ..storage.writepoint import disk_errno
from .merge import BASE_INFO_FILE, TrainedRows, merged_model

DELTA_NAME = "wakelab-delta"
FULL_NAME = "wakelab-model"
#: Tag on every logged model wakelab makes: ``delta`` or ``full``.
KIND_TAG = "wakelab.model_kind"


def _params(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, str]:
    keys = ("base_model", "revision", "num_base", "vocab_size", "base_checksum", "hidden_size", "strategy")
    values = {f"base.{k}" if k in ("revision", "base_checksum") else k: base.get(k) for k in keys}
    values.update(extra)
    return {k: str(v) for k, v in values.items() if v is not None}


def log_delta_model(
    run_id: str, experiment_id: str, final_dir: Path, base: dict[str, Any], tokenizer, add_as: str, step: int = 0
) -> str:
    """Log the run's delta (rows, ids, tokenizer, base record) as a logged model of the run; its model id."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    from ..tracking.runs import mlflow_client

    client = mlflow_client()
    rows_file = final_dir / "new_rows.safetensors"
    new_tokens = int(TrainedRows.read(rows_file, base).token_ids.numel())
    model = client.create_logged_model(
        experiment_id,
        name=DELTA_NAME,
        source_run_id=run_id,
        model_type="wakelab-delta",
        params=_params(base, {"new_tokens": new_tokens, "add_as": add_as}),
        tags={KIND_TAG: "delta"},
    )
    with tempfile.TemporaryDirectory(prefix="wakelab-delta-") as tmp:
        folder = Path(tmp)
        shutil.copy2(rows_file, folder / rows_file.name)
        if (final_dir / BASE_INFO_FILE).exists():
            shutil.copy2(final_dir / BASE_INFO_FILE, folder / BASE_INFO_FILE)
        tokenizer.save_pretrained(folder / "tokenizer")
        (folder / "README.txt").write_text(
            "The new vocabulary of a wakelab run, without its base model.\n"
            f"Base: {base.get('base_model')} (revision {base.get('revision')}), {base.get('num_base')} tokens, "
            f"embedding sha256 {base.get('base_checksum')}.\n"
            "new_rows.safetensors: token_ids + rows (+ head_rows for an untied head).\n"
            "Make a transformers folder from the run: wakelab export RUN_ID --to DIR --format hf|peft\n",
            encoding="utf-8",
        )
        client.log_model_artifacts(model.model_id, str(folder))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    return model.model_id


def log_full_model(
    model,
    tokenizer,
    run_id: str | None,
    *,
    registered_model_name: str | None = None,
    params: dict[str, Any] | None = None,
    step: int = 0,
) -> str:
    """Log the merged model in MLflow's transformers flavour, linked to ``run_id`` (without reopening it); the
    ``models:/`` URI to load it from."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    from ..tracking.runs import mlflow_client

    client = mlflow_client()
    experiment_id = client.get_run(run_id).info.experiment_id if run_id else None
    flat = {k: (v if isinstance(v, (str, int, float)) else str(v)) for k, v in (params or {}).items() if v is not None}
    logged = mlflow.initialize_logged_model(
        name=FULL_NAME,
        source_run_id=run_id,
        experiment_id=experiment_id,
        params={k: str(v) for k, v in flat.items()},
        tags={KIND_TAG: "full"},
    )
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        task="text-generation",
        name=FULL_NAME,
        model_id=logged.model_id,
        registered_model_name=registered_model_name,
        pip_requirements=_requirements(),
    )
    active = mlflow.active_run()
    if run_id and not (active and active.info.run_id == run_id):  # log_model links it to the active run itself
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
    return info.model_uri


def _requirements() -> list[str]:
    """The model's pip requirements, stated (MLflow's inference would load the model again in a subprocess)."""
    from ..tracking.runs import library_versions

    versions = library_versions()
    return [
        f"{name}=={versions[name]}"
        for name in ("torch", "transformers", "accelerate", "safetensors")
        if name in versions
    ]


def log_run_model(
    config: RunConfig, tracked, final_dir: Path, base: dict[str, Any], tokenizer, log: Callable[[str], None]
) -> str | None:
    """At the end of a run: its logged model as ``tracking.log_model`` asks (delta, full or none).

    A failure here is a warning, not a failed run: the rows are on disk and ``wakelab export`` makes the same
    model from them later.
    """
    kind = config.tracking.log_model
    if kind == "none" or config.train.trainable == "full" or getattr(tracked, "offline", False):
        return None
    try:
        if kind == "full":
            trained = TrainedRows.read(final_dir / "new_rows.safetensors", base)
            source = model_mod.model_source(config.model, config.train.seed)
            model = merged_model(config, trained, tokenizer, source=source)
            uri = log_full_model(
                model, tokenizer, tracked.run_id, params=_params(base, {"add_as": config.vocab.add_as})
            )
            log(f"logged the full model: {uri}")
            return uri
        model_id = log_delta_model(
            tracked.run_id, tracked.experiment_id, final_dir, base, tokenizer, config.vocab.add_as
        )
        log(f"logged model models:/{model_id} (the new rows and tokenizer; base {base.get('base_model')})")
        return model_id
    except Exception as exc:  # noqa: BLE001 - the run's files are complete; the logged model can be made later
        if disk_errno(exc) is not None:
            raise  # a full disk or an I/O error is the run's failure, said in one line (wakelab.storage.writepoint)
        log(
            f"warning: could not log the run's model to MLflow ({str(exc).splitlines()[0][:200]}); "
            f"`wakelab export {tracked.run_id} --to mlflow` logs it later"
        )
        return None
