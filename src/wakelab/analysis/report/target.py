"""What an analysis reads and where it goes: the run, its state, recording and MLflow runs."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import WakelabError

Warn = Callable[[str], None]

CUT_SHORT_TAG = "wakelab.analysis.recording_cut_short"

NORM_STATS = ("count", "mean", "std", "min", "max", "q05", "q25", "q50", "q75", "q95")


@dataclass
class AnalyzeOptions:
    """What to analyse and where to log it (the ``wakelab analyze`` options)."""

    checkpoint: str | None = None
    initial: bool = False
    sample_size: int = 1000
    seed: int = 0
    probes: tuple[str, ...] = ()
    num_probes: int = 10
    top_k: int = 10
    evaluate: bool = True
    eval_max_blocks: int | None = None
    static: bool = True
    recording: str | None = None  # None: no dynamics; "": the run's own recording; else a path
    from_step: int | None = None
    to_step: int | None = None
    freeze_threshold: float = 1e-6
    trajectory: bool = True  # with a recording: the trajectory page, GIF, image frames and per-token table
    trajectory_tokens: str = "auto"
    nested: bool = False
    mlflow: bool = True
    out: str | None = None
    samples: int = 3  # text samples from held-out prompts with new words (0: none)


@dataclass
class AnalysisReport:
    """What an analysis produced: where it went, the summary lines, and the main results."""

    local_dir: Path
    run_id: str | None  # the MLflow run the analysis was logged to
    summary: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    metric_names: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n".join(self.summary)


@dataclass
class _Run:
    target: str
    run_dir: Path
    run_id: str | None  # as found in the tracking store (None if it is not there)
    client: Any
    label: str
    experiment_id: str | None = None


def _resolve(target: str, warn: Warn) -> _Run:
    import mlflow
    from mlflow.exceptions import MlflowException

    from ...run.state import resolve_run
    from ...tracking.runs import mlflow_client

    run_dir, run_id = resolve_run(str(target))
    client = mlflow_client()
    found = None
    if run_id is not None:
        uris = [None]
        info = run_dir / "wakelab_run.json"
        if info.is_file():
            uri = json.loads(info.read_text()).get("tracking_uri")
            if uri and uri != mlflow.get_tracking_uri():  # the store the run was tracked in
                uris.append(uri)
        for uri in uris:
            candidate = client if uri is None else mlflow_client(uri)
            try:
                found = candidate.get_run(run_id)
                client = candidate
                break
            except MlflowException:
                continue
        if found is None:
            warn(f"run {run_id} of {run_dir} is not in the MLflow tracking store; the analysis goes to a new run")
            run_id = None
    label = (found.data.tags.get("mlflow.runName") if found else None) or run_dir.resolve().name
    return _Run(str(target), run_dir, run_id, client, label, found.info.experiment_id if found else None)


def _experiment_id(client, run: _Run) -> str:
    if run.experiment_id is not None:
        return run.experiment_id
    name = "wakelab"
    config = run.run_dir / "config.yaml"
    if config.is_file():
        import yaml

        name = (yaml.safe_load(config.read_text()).get("tracking") or {}).get("experiment") or name
    from ...tracking.runs import ensure_experiment

    return ensure_experiment(name, client)


def _outer_run(client, tags: dict[str, str], exclude: str | None) -> str | None:
    """The run `mlflow run` created for this command (MLFLOW_RUN_ID), when it is not the analysed run itself."""
    outer = os.environ.get("MLFLOW_RUN_ID")
    if not outer or outer == exclude:
        return None
    for key, value in tags.items():
        client.set_tag(outer, key, value)
    return outer


def _new_run(client, run: _Run, name: str, tags: dict[str, str], parent: str | None) -> str:
    tags = {"mlflow.runName": name, **tags}
    if parent:
        tags["mlflow.parentRunId"] = parent
    return client.create_run(_experiment_id(client, run), tags=tags).info.run_id


def _state_target(run: _Run, checkpoint: str | None) -> str:
    """What ``load_trained`` reads: the run itself, or one of its checkpoints (a path, a name or a step)."""
    if checkpoint is None:
        return run.target
    candidates = [Path(checkpoint), run.run_dir / checkpoint]
    if checkpoint.isdigit():
        candidates.append(run.run_dir / f"checkpoint-{checkpoint}")
    for candidate in candidates:
        if (candidate / "manifest.json").is_file():
            return str(candidate)
    from ...storage.checkpoints import list_checkpoints

    have = ", ".join(p.name for p in list_checkpoints(run.run_dir)) or "none"
    raise WakelabError(f"--checkpoint {checkpoint}: no complete checkpoint there or in {run.run_dir} (it has: {have})")


def _state_label(state, initial: bool) -> str:
    """``initial``, ``checkpoint-N`` (asked for, or the latest when a run has no final rows) or ``final``."""
    if initial:
        return "initial"
    return f"checkpoint-{state.step}" if state.step is not None else "final"


def default_recording(run_dir: Path, run_id: str | None = None, client=None) -> Path:
    """The run's recording: the ``wakelab.recording.path`` tag, else ``<run_dir>/recording``, else the latest
    ``recording-from-step-N``; a WakelabError that says how to record when there is none."""
    if run_id is not None and client is not None:
        tagged = client.get_run(run_id).data.tags.get("wakelab.recording.path")
        if tagged and (Path(tagged) / "index.json").is_file():
            return Path(tagged)
    if (run_dir / "recording" / "index.json").is_file():
        return run_dir / "recording"
    resumed = sorted(
        run_dir.glob("recording-from-step-*/index.json"), key=lambda p: int(p.parent.name.rsplit("-", 1)[1])
    )
    if resumed:
        return resumed[-1].parent
    raise WakelabError(
        f"run {run_dir} has no recording (no {run_dir / 'recording'}); record one with `wakelab run --plugin recorder` "
        "(recorder.rows, recorder.fields and recorder.dtype choose what), or give --recording PATH"
    )


def _recording_path(run: _Run, given: str) -> Path:
    if not given:
        return default_recording(run.run_dir, run.run_id, run.client)
    path = Path(given)
    if not path.exists():
        raise WakelabError(
            f"no recording at {path}: it does not exist; record one with `wakelab run --plugin recorder`, or leave "
            "PATH out to use the run's own recording"
        )
    return path


def loss_history(run_id: str | None, run_dir: Path, client=None) -> tuple[list[int], list[float], str] | None:
    """``(steps, losses, source)``: MLflow's ``loss`` history of the run, else ``trainer_state.json`` of the latest
    checkpoint; None when neither has any. A step logged twice (a resumed run) keeps its latest value."""
    if run_id is not None and client is not None:
        history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: (m.step, m.timestamp))
        by_step = {m.step: m.value for m in history}
        if by_step:
            steps = sorted(by_step)
            return steps, [by_step[s] for s in steps], "MLflow metric history of `loss`"
    from ...storage.checkpoints import CheckpointError, latest_checkpoint

    try:
        checkpoint = latest_checkpoint(run_dir)
    except CheckpointError:
        return None
    state_file = checkpoint / "trainer_state.json"
    if not state_file.is_file():
        return None
    entries = [e for e in json.loads(state_file.read_text()).get("log_history", []) if "loss" in e and "step" in e]
    by_step = {int(e["step"]): float(e["loss"]) for e in entries}
    if not by_step:
        return None
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps], f"{state_file}"


def _heldout_dataset(config, tokenizer):
    from ...data.corpus import build_datasets, resolve_data_paths, text_form, token_cache_dir

    _, corpus_path, heldout_path = resolve_data_paths(config)
    return build_datasets(
        config.data, corpus_path, heldout_path, tokenizer, token_cache_dir(config.data), text_form(config)
    ).heldout


def _logged_perplexity(run: _Run) -> dict[str, float]:
    if run.run_id is None:
        return {}
    metrics = run.client.get_run(run.run_id).data.metrics
    return {k: metrics[f"heldout_perplexity_{k}"] for k in ("before", "after") if f"heldout_perplexity_{k}" in metrics}


def _collecting(warn: Warn | None, into: list[str]) -> Warn:
    def _warn(message: str) -> None:
        into.append(message)
        if warn is not None:
            warn(message)

    return _warn


def _open_destination(
    run: _Run, opts: AnalyzeOptions, name: str, extra_tags: dict[str, str]
) -> tuple[Any, str | None, bool]:
    """(client, run id to log to, whether the run was created here)."""
    if not opts.mlflow:
        return None, None, False
    client = run.client
    tags = {"wakelab.analysis.kind": "analysis", **extra_tags}
    if run.run_id is not None:
        tags["wakelab.analysis.source_run"] = run.run_id
    outer = _outer_run(client, tags, exclude=run.run_id)
    if outer is not None:  # under `mlflow run -e analyze`: one run, the one MLflow made
        return client, outer, False
    if run.run_id is not None and not opts.nested:
        return client, run.run_id, False
    return client, _new_run(client, run, name, tags, parent=run.run_id), True


def _saved_tokenizer(run_dir: Path):
    """The run's expanded tokenizer as saved in final/tokenizer (None if not saved): token strings for tables."""
    folder = run_dir / "final" / "tokenizer"
    if not folder.is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - strings are a nicety; ids are enough
        return None
