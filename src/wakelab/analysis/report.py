"""``wakelab analyze``: the P1 evaluation of a run's embeddings and the dynamics of its recording, as files and in
MLflow.

For one run (:func:`analyze_run`) on a chosen state (final, a checkpoint, or the state right after init):

- norms of all / base / new rows (table + histogram), isotropy of base and new rows with a confidence interval
  (table + plot), nearest-neighbour probes among base and among new tokens (table);
- the training-loss curve (MLflow's ``loss`` history, else the latest checkpoint's ``trainer_state.json``);
- held-out perplexity before vs after training, recomputed from the initial and the analysed state (or the logged
  metrics with ``evaluate=False``);
- with a recording: the dynamics of :mod:`wakelab.analysis.recording_dynamics` (displacement, freeze verdict and
  onset, bf16 lattice hops, centroid track), streamed.

Several runs (:func:`compare_runs`): their loss curves (and with a recording, displacement per step and freeze onset)
on shared plots, logged to a new "comparison" run.

Layout, locally under ``<run_dir>/analysis/`` and as MLflow artifacts under ``analysis/``::

    analysis/summary.txt                         the text summary of the latest analysis
    analysis/loss/loss_curve.{png,json,csv}
    analysis/<state>/                            final, initial or checkpoint-N
        norms.{json,csv}  norm_histogram.png  isotropy.{json,csv,png}  neighbours.{json,csv}  perplexity.{json,csv}
    analysis/dynamics/                           (dynamics-<dir> for a recording not named `recording`)
        recording.json  displacement.{json,csv}  freeze_verdict.{json,csv}  displacement_per_token.{json,csv}
        displacement_histogram.png  freeze_onset.{json,csv,png}  lattice_hops.{json,csv,png}  centroid.{json,csv,png}
    analysis/comparison/                         (on the comparison run)
        loss_curves.{png,json,csv}  runs.{json,csv}  [displacement_per_step.png  freeze_onset.png  dynamics_per_step.*]

Metrics are named ``analysis/...`` and logged at the analysed state's step (per-step dynamics at each step).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import WakelabError
from . import plots
from .embeddings import isotropy, nearest_neighbours, norm_stats
from .recording_dynamics import DynamicsResult, analyse_recording, describe
from .sink import AnalysisSink

__all__ = ["AnalyzeOptions", "AnalysisReport", "analyze_run", "compare_runs", "default_recording", "loss_history"]

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


# ----------------------------------------------------------------------------------------------------------------------
# Runs, states and the MLflow run to log to


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

    from ..state import resolve_run
    from ..tracking import mlflow_client

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
    from ..tracking import ensure_experiment

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
    from ..checkpoints import list_checkpoints

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


# ----------------------------------------------------------------------------------------------------------------------
# Loss and perplexity


def loss_history(run_id: str | None, run_dir: Path, client=None) -> tuple[list[int], list[float], str] | None:
    """``(steps, losses, source)``: MLflow's ``loss`` history of the run, else ``trainer_state.json`` of the latest
    checkpoint; None when neither has any. A step logged twice (a resumed run) keeps its latest value."""
    if run_id is not None and client is not None:
        history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: (m.step, m.timestamp))
        by_step = {m.step: m.value for m in history}
        if by_step:
            steps = sorted(by_step)
            return steps, [by_step[s] for s in steps], "MLflow metric history of `loss`"
    from ..checkpoints import CheckpointError, latest_checkpoint

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
    from ..data import build_datasets, resolve_data_paths, text_form, token_cache_dir

    _, corpus_path, heldout_path = resolve_data_paths(config)
    return build_datasets(
        config.data, corpus_path, heldout_path, tokenizer, token_cache_dir(config.data), text_form(config)
    ).heldout


def _logged_perplexity(run: _Run) -> dict[str, float]:
    if run.run_id is None:
        return {}
    metrics = run.client.get_run(run.run_id).data.metrics
    return {k: metrics[f"heldout_perplexity_{k}"] for k in ("before", "after") if f"heldout_perplexity_{k}" in metrics}


# ----------------------------------------------------------------------------------------------------------------------
# Figures this module adds to wakelab.analysis.plots


def isotropy_plot(results: dict[str, dict]) -> Any:
    """Mean pairwise cosine per group, with its confidence interval as error bars."""
    fig, (ax,) = plots.new_figure(width=5.5)
    groups = list(results)
    means = [results[g]["mean_cosine"] for g in groups]
    errors = [[m - results[g]["ci_low"] for g, m in zip(groups, means, strict=True)],
              [results[g]["ci_high"] - m for g, m in zip(groups, means, strict=True)]]  # fmt: skip
    confidence = next(iter(results.values()))["confidence"] if results else 0.95
    colours = ["tab:blue", "tab:orange", "tab:green"][: len(groups)]
    labels = [f"{g} tokens (n={results[g]['sample_size']})" for g in groups]
    ax.bar(labels, means, yerr=errors, capsize=8, color=colours, label=f"mean cosine, {confidence:.0%} CI")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_title("Isotropy: mean pairwise cosine of sampled rows")
    ax.set_xlabel("token group (sampled rows)")
    ax.set_ylabel("mean pairwise cosine (unitless)")
    return fig


def displacement_histogram(disp: torch.Tensor, trained: torch.Tensor | None, from_step: int, to_step: int) -> Any:
    """Histogram of per-row displacement (log-count axis), trained vs untrained rows when known."""
    import numpy as np

    fig, (ax,) = plots.new_figure()
    values = disp.detach().float().numpy()
    edges = np.histogram_bin_edges(values, bins=60) if values.size and values.max() > values.min() else 60
    groups = [("tracked rows", values)] if trained is None else [
        ("trained rows", values[trained.numpy()]), ("untrained rows", values[~trained.numpy()])]  # fmt: skip
    for label, part in groups:
        if part.size:
            ax.hist(part, bins=edges, alpha=0.6, label=f"{label} (n={part.size})")
    ax.set_yscale("log")
    ax.set_title(f"Per-token displacement, step {from_step} to {to_step}")
    ax.set_xlabel("L2 distance moved (embedding units)")
    ax.set_ylabel("rows per bin (log scale)")
    handles, labels = ax.get_legend_handles_labels()
    if len(handles) > 1:
        ax.legend(loc="best")
    return fig


# ----------------------------------------------------------------------------------------------------------------------
# The static analyses of one state


def _token_text(tokenizer, token_id: int) -> str:
    """The token as text; the raw token (e.g. byte-level ``Ġ...``) when it is part of a character alone."""
    try:
        text = tokenizer.decode([int(token_id)])
    except Exception:  # noqa: BLE001 - a token that does not decode alone: show the raw token
        text = "\ufffd"
    return str(tokenizer.convert_ids_to_tokens(int(token_id))) if "\ufffd" in text else text


def probe_ids(tokenizer, words: tuple[str, ...]) -> tuple[list[tuple[str, int]], list[str]]:
    """Token ids of probe words (the token itself, or a word that encodes to one token); and the words not found."""
    vocab = tokenizer.get_vocab()
    found, missing = [], []
    for word in words:
        token_id = vocab.get(word)
        if token_id is None:
            for text in (word, " " + word):
                ids = tokenizer.encode(text, add_special_tokens=False)
                if len(ids) == 1:
                    token_id = ids[0]
                    break
        if token_id is None:
            missing.append(word)
        else:
            found.append((word, int(token_id)))
    return found, missing


def static_analysis(state, opts: AnalyzeOptions, sink: AnalysisSink, prefix: str, step: int, warn: Warn) -> dict:
    """Norms, isotropy and neighbour probes of ``state``'s embedding matrix into ``sink`` under ``prefix``."""
    rows = state.rows
    weight = rows.values()
    num_base, num_total = rows.num_base, rows.num_total
    out: dict[str, Any] = {"notes": []}

    norms = norm_stats(weight, num_base)
    sink.table(f"{prefix}/norms", [{"group": g, **s} for g, s in norms.items()])
    row_norms = weight.detach().float().norm(dim=1)
    sink.figure(f"{prefix}/norm_histogram", plots.norm_histogram(row_norms[:num_base], row_norms[num_base:]))
    sink.metrics({f"norms/{g}/{k}": s[k] for g, s in norms.items() for k in NORM_STATS if k != "count"}, step)
    out["norms"] = norms

    iso: dict[str, dict] = {}
    for group, ids in (("base", range(num_base)), ("new", range(num_base, num_total))):
        if len(ids) < 2:
            out["notes"].append(f"isotropy of {group} rows skipped: {len(ids)} row(s)")
            continue
        iso[group] = isotropy(weight, ids, opts.sample_size, opts.seed)
    if iso:
        sink.table(f"{prefix}/isotropy", [{"group": g, **r, "seed": opts.seed} for g, r in iso.items()])
        sink.figure(f"{prefix}/isotropy", isotropy_plot(iso))
        sink.metrics({f"isotropy/{g}/{k}": r[k] for g, r in iso.items() for k in ("mean_cosine", "ci_low", "ci_high")},
                     step)  # fmt: skip
    out["isotropy"] = iso

    tokenizer = state.tokenizer
    found, missing = probe_ids(tokenizer, tuple(opts.probes))
    for word in missing:
        warn(f"probe '{word}' is not in the vocabulary; skipped (the other probes are analysed)")
    if not opts.probes:
        pool = torch.arange(num_base, num_total) if num_total > num_base else torch.arange(num_base)
        picked = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(opts.seed))[: opts.num_probes]]
        found = [(_token_text(tokenizer, i), int(i)) for i in picked.sort().values.tolist()]
    table = []
    top1: dict[str, list[float]] = {"base": [], "new": []}
    pools = {"base": torch.arange(num_base), "new": torch.arange(num_base, num_total)}
    query = [token_id for _, token_id in found]
    for pool, candidates in pools.items():
        if not query or candidates.numel() == 0:
            continue
        neighbours = nearest_neighbours(weight, query, candidates, k=opts.top_k)
        for (word, token_id), hits in zip(found, neighbours, strict=True):
            if hits:
                top1[pool].append(hits[0][1])
            for rank, (neighbour, cosine) in enumerate(hits, start=1):
                table.append({"probe": word, "probe_id": token_id, "pool": pool, "rank": rank,
                              "neighbour": _token_text(tokenizer, neighbour), "neighbour_id": neighbour,
                              "cosine": cosine})  # fmt: skip
    sink.table(f"{prefix}/neighbours", table)
    sink.metrics({f"neighbours/{p}_top1_cosine_mean": sum(v) / len(v) for p, v in top1.items() if v}, step)
    out.update(probes=found, missing_probes=missing, neighbours=table)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Dynamics of a recording into a sink


def dynamics_outputs(result: DynamicsResult, sink: AnalysisSink, prefix: str, tokenizer=None) -> None:
    """Tables, figures, metrics and the cut-short tag of a :class:`DynamicsResult`."""
    sink.json(f"{prefix}/recording", describe(result))
    summary = result.displacement_summary
    sink.table(f"{prefix}/displacement", [{"group": g, "from_step": result.from_step, "to_step": result.to_step, **s}
                                          for g, s in summary.items()])  # fmt: skip
    sink.table(
        f"{prefix}/freeze_verdict", [{**result.freeze, "from_step": result.from_step, "to_step": result.to_step}]
    )
    ids = result.token_ids if result.token_ids is not None else list(range(result.num_rows))
    trained = result.masks.trained if result.masks is not None else None
    per_token = []
    for position, (token_id, moved) in enumerate(zip(ids, result.displacement.tolist(), strict=True)):
        row = {"row": position, "token_id": token_id}
        if tokenizer is not None and token_id < len(tokenizer):
            row["token"] = _token_text(tokenizer, token_id)
        row["displacement"] = moved
        if trained is not None:
            row["trained"] = bool(trained[position])
        per_token.append(row)
    sink.table(f"{prefix}/displacement_per_token", per_token)
    sink.figure(f"{prefix}/displacement_histogram",
                displacement_histogram(result.displacement, trained, result.from_step, result.to_step))  # fmt: skip
    sink.table(f"{prefix}/freeze_onset", result.freeze_onset)
    if result.freeze_onset:
        sink.figure(f"{prefix}/freeze_onset", plots.freeze_onset_plot(result.freeze_onset))
    if result.lattice_hops is not None:
        sink.table(f"{prefix}/lattice_hops", result.lattice_hops)
        if result.lattice_hops:
            sink.figure(f"{prefix}/lattice_hops", plots.lattice_hops_plot(result.lattice_hops))
    sink.table(f"{prefix}/centroid", [{**r, "group": result.centroid_group} for r in result.centroid])
    sink.figure(f"{prefix}/centroid", plots.centroid_plot(result.centroid))

    stats = ("max", "mean", "median")
    sink.metrics({f"dynamics/displacement/{g}/{k}": s[k] for g, s in summary.items() for k in stats}, result.to_step)
    sink.metrics({"dynamics/frozen": result.freeze["frozen"], "dynamics/frozen_mean": result.freeze["mean"]},
                 result.to_step)  # fmt: skip
    per_step = {"unchanged_share", "mean_displacement", "untrained_unchanged_share", "trained_unchanged_share"}
    for record in result.freeze_onset:
        sink.metrics({f"dynamics/{k}": v for k, v in record.items() if k in per_step}, record["step"])
    for record in result.lattice_hops or []:
        sink.metrics({f"dynamics/{k}": record[k] for k in ("rows_moved", "coords_moved", "rounded_away",
                                                            "subhalf_ulp_share")}, record["step"])  # fmt: skip
    for record in result.centroid:
        sink.metrics({"dynamics/centroid_norm": record["centroid_norm"], "dynamics/radius": record["radius"]},
                     record["step"])  # fmt: skip
    if result.motion is not None:
        motion = result.motion
        kinds = [k for k in motion if k.endswith("_per_lr")]
        rows = [
            {
                "step": step,
                "lr_sum": motion["lr_sum"][i],
                **{
                    k: motion[k][i]
                    for k in ("raw", "drift", "relative", "master_raw", "master_drift", "master_relative")
                    if k in motion
                },
                **{k: motion[k][i] for k in kinds},
            }
            for i, step in enumerate(motion["steps"])
        ]
        sink.table(f"{prefix}/group_motion", rows)
        for row in rows:
            sink.metrics(
                {f"dynamics/group/{k}": v for k, v in row.items() if k != "step" and v is not None}, row["step"]
            )
    sink.tags({CUT_SHORT_TAG: str(not result.complete).lower()})


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def dynamics_lines(result: DynamicsResult) -> list[str]:
    steps = result.steps
    status = "complete" if result.complete else "CUT SHORT (writer did not finish; analysed the complete steps)"
    lines = [
        f"recording  {result.path}: steps {steps[0]}..{steps[-1]} ({len(steps)}), {result.num_rows} rows, {status}"
    ]
    for group, s in result.displacement_summary.items():
        lines.append(f"  displacement {result.from_step}->{result.to_step} {group} (n={s['count']}): "
                     f"max {_fmt(s['max'])}, mean {_fmt(s['mean'])}, median {_fmt(s['median'])}")  # fmt: skip
    verdict = result.freeze
    lines.append(f"  freeze verdict ({verdict['group']}, n={verdict['count']}): "
                 f"{'FROZEN' if verdict['frozen'] else 'not frozen'} (mean displacement {_fmt(verdict['mean'])} "
                 f"{'<' if verdict['frozen'] else '>='} threshold {verdict['threshold']:g})")  # fmt: skip
    if result.freeze_onset:
        last = result.freeze_onset[-1]
        lines.append(f"  freeze onset: at step {last['step']}, {last['unchanged_share']:.1%} of rows unchanged from "
                     f"step {last['previous_step']}; mean displacement {_fmt(last['mean_displacement'])}")  # fmt: skip
    if result.lattice_hops:
        coords = sum(r["coords_moved"] for r in result.lattice_hops)
        away = sum(r["rounded_away"] for r in result.lattice_hops)
        nonzero = sum(r["nonzero_updates"] for r in result.lattice_hops)
        share = f"{away / nonzero:.1%}" if nonzero else "n/a"
        lines.append(f"  bf16 lattice: {coords} coordinate hops over {len(result.lattice_hops)} steps; "
                     f"{away} of {nonzero} nonzero updates ({share}) below half an ULP, rounded away")  # fmt: skip
    if result.centroid:
        first, last = result.centroid[0], result.centroid[-1]
        lines.append(f"  centroid ({result.centroid_group}): norm {_fmt(first['centroid_norm'])} -> "
                     f"{_fmt(last['centroid_norm'])}, radius {_fmt(first['radius'])} -> "
                     f"{_fmt(last['radius'])}")  # fmt: skip
    if result.motion is not None:
        m = result.motion
        lines.append(
            f"  {result.centroid_group} rows {m['steps'][0]}->{m['steps'][-1]}: displacement "
            f"{_fmt(m['raw'][-1])} ({_fmt(m['raw_per_lr'][-1])} per unit of summed lr) = common drift "
            f"{_fmt(m['drift'][-1])} + "
            f"relative motion {_fmt(m['relative'][-1])} ({_fmt(m['relative_per_lr'][-1])} per unit lr)"
        )
        if "master_raw" in m:
            lines.append(
                f"  their fp32 masters: displacement {_fmt(m['master_raw'][-1])}, common drift "
                f"{_fmt(m['master_drift'][-1])}, relative motion {_fmt(m['master_relative'][-1])}"
            )
    lines += [f"  note: {note}" for note in result.notes]
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# One run


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


def analyze_run(target: str, opts: AnalyzeOptions | None = None, warn: Warn | None = None) -> AnalysisReport:
    """Analyse one run (directory, checkpoint or MLflow run id) and log it; see the module docstring."""
    opts = opts or AnalyzeOptions()
    warnings: list[str] = []
    warn = _collecting(warn, warnings)
    run = _resolve(target, warn)
    # Bad input is found before anything is written or a run is created.
    recording_path = _recording_path(run, opts.recording) if opts.recording is not None else None
    state_target = _state_target(run, opts.checkpoint) if opts.static else None
    local = Path(opts.out) if opts.out else run.run_dir / "analysis"
    client, dest, created = _open_destination(
        run, opts, f"analysis-{run.label}", {"wakelab.analysis.output_dir": str(run.run_dir)}
    )
    sink = AnalysisSink(local, dest, client)
    report = AnalysisReport(local, dest, warnings=warnings)
    status = "FAILED"
    try:
        _analyze_into(run, opts, state_target, recording_path, sink, report, warn)
        status = "FINISHED"
    finally:
        try:
            if status == "FINISHED":
                sink.flush()
        finally:
            if created:
                client.set_terminated(dest, status)
    report.files = list(sink.files)
    return report


def _analyze_into(
    run: _Run,
    opts: AnalyzeOptions,
    state_target: str | None,
    recording_path: Path | None,
    sink: AnalysisSink,
    report: AnalysisReport,
    warn: Warn,
) -> None:
    lines = report.summary
    history = loss_history(run.run_id, run.run_dir, run.client)
    final_step = history[0][-1] if history else None

    state_lines: list[str] = []
    label = None
    if opts.static:
        from ..state import load_trained

        state = load_trained(state_target, initial=opts.initial)
        label = _state_label(state, opts.initial)
        if final_step is None:
            final_step = state.config.train.max_steps
        step = 0 if opts.initial else (state.step if state.step is not None else final_step)
        if (
            label.startswith("checkpoint")
            and opts.checkpoint is None
            and not Path(run.target, "manifest.json").exists()
        ):
            warn(f"{run.run_dir} has no final rows; analysed its latest checkpoint ({label})")
        static = static_analysis(state, opts, sink, label, step, warn)
        report.results["static"] = static
        report.results["state"] = {"label": label, "step": step}
        state_lines += _static_lines(static, state.rows.num_base, state.rows.num_total)
        samples = _samples(state, opts, sink, label, warn) if opts.samples else []  # before perplexity frees the model
        ppl = _perplexity(run, state, state_target, opts, sink, label, step, warn)
        report.results["perplexity"] = ppl
        state_lines += ppl.pop("lines") + samples
        tokenizer = state.tokenizer
        del state
    else:
        tokenizer = _saved_tokenizer(run.run_dir)

    head = f"analysis of {run.label} ({run.run_dir})"
    if label is not None:
        head += f", state {label} (step {report.results['state']['step']})"
    lines.append(head)
    lines += state_lines

    if history:
        steps, losses, source = history
        sink.table("loss/loss_curve", [{"step": s, "loss": v} for s, v in zip(steps, losses, strict=True)])
        fig = plots.loss_curve(steps, losses, label=run.label)
        sink.figure("loss/loss_curve", fig)
        report.figures["loss_curve"] = fig
        report.results["loss"] = {"steps": steps, "losses": losses, "source": source}
        lines.append(f"loss       {len(steps)} points, step {steps[0]}: {losses[0]:.4g} -> step {steps[-1]}: "
                     f"{losses[-1]:.4g} (from {source})")  # fmt: skip
    else:
        lines.append(
            "loss       no loss history (MLflow has no `loss` metric and no checkpoint has trainer_state.json)"
        )

    if recording_path is not None:
        result = analyse_recording(recording_path, from_step=opts.from_step, to_step=opts.to_step,
                                   freeze_threshold=opts.freeze_threshold)  # fmt: skip
        prefix = "dynamics" if recording_path.name == "recording" else f"dynamics-{recording_path.name}"
        dynamics_outputs(result, sink, prefix, tokenizer)
        report.results["dynamics"] = result
        lines += dynamics_lines(result)
        if not result.complete:
            warn(f"recording {recording_path} was cut short (its writer did not finish); analysed its "
                 f"{len(result.steps)} complete steps")  # fmt: skip
        if opts.trajectory:
            from .recording_trajectory import recording_trajectory

            traj_prefix = prefix.replace("dynamics", "trajectory", 1)
            drawn = recording_trajectory(recording_path, run.target, sink, traj_prefix, tokens=opts.trajectory_tokens,
                                         seed=opts.seed, from_step=opts.from_step, to_step=opts.to_step,
                                         warn=warn)  # fmt: skip
            report.results["trajectory"] = drawn
            lines.append(f"trajectory {drawn['tracked']} of {drawn['new_rows']} new rows over {drawn['frames']} "
                         f"frames: {drawn['folder']}/trajectory.html, .gif, tokens.csv")  # fmt: skip

    for message in report.warnings:
        lines.append(f"warning    {message}")
    where = f"MLflow run {sink.run_id} under analysis/" if sink.run_id else "no MLflow run (--no-mlflow)"
    lines.append(f"logged to  {where}; files in {sink.local_dir}")
    sink.text("summary.txt", report.text)
    sink.tags({"wakelab.analysis.last": time.strftime("%Y-%m-%dT%H:%M:%S")})
    report.metric_names = sink.metric_names


def _samples(state, opts: AnalyzeOptions, sink: AnalysisSink, label: str, warn: Warn) -> list[str]:
    """A few continuations of held-out prompts that hold new words: a table (and text) the MLflow UI shows."""
    from ..data import resolve_data_paths
    from ..generate import samples

    heldout = resolve_data_paths(state.config)[2]
    if heldout is None or not Path(heldout).is_file():
        warn("no held-out text to cut sample prompts from; no samples")
        return []
    rows = samples(
        state.model,
        state.tokenizer,
        state.rows.num_base,
        Path(heldout).read_text(encoding="utf-8"),
        count=opts.samples,
        seed=opts.seed,
    )
    if not rows:
        warn("the held-out text holds no new words; no samples")
        return []
    sink.table(f"{label}/samples", rows)
    sink.text(f"{label}/samples.txt", "\n\n".join(f"{r['prompt']}[...]{r['continuation']}" for r in rows))
    return [
        f"samples    {len(rows)} continuations of held-out prompts with new words "
        f"({sum(r['new_tokens_generated'] for r in rows)} new-word tokens generated) -> {label}/samples"
    ]


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


def _static_lines(static: dict, num_base: int, num_total: int) -> list[str]:
    norms = static["norms"]
    lines = [f"norms      base mean {_fmt(norms['base']['mean'])} (n={num_base}), new mean "
             f"{_fmt(norms['new']['mean'])} (n={num_total - num_base})"]  # fmt: skip
    for group, r in static["isotropy"].items():
        lines.append(f"isotropy   {group}: mean cosine {r['mean_cosine']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}] "
                     f"({r['confidence']:.0%} CI, {r['sample_size']} rows)")  # fmt: skip
    by_probe: dict[tuple[str, int], dict[str, list]] = {}
    for row in static["neighbours"]:
        by_probe.setdefault((row["probe"], row["probe_id"]), {}).setdefault(row["pool"], []).append(row)
    for (word, token_id), pools in list(by_probe.items())[:5]:
        parts = []
        for pool, hits in pools.items():
            shown = ", ".join(f"{h['neighbour']!r} {h['cosine']:.2f}" for h in hits[:3])
            parts.append(f"{pool}: {shown}")
        lines.append(f"neighbours {word!r} ({token_id}): " + "; ".join(parts))
    if len(by_probe) > 5:
        lines.append(f"neighbours ... {len(by_probe) - 5} more probes in the neighbours table")
    lines += [f"note       {n}" for n in static["notes"]]
    return lines


def _perplexity(
    run: _Run, state, state_target: str, opts: AnalyzeOptions, sink: AnalysisSink, label: str, step: int, warn: Warn
) -> dict:
    """Held-out perplexity of the initial and the analysed state (the final one when the initial is analysed)."""
    from ..evaluation import perplexity
    from ..state import load_trained

    logged = _logged_perplexity(run)
    rows: list[dict] = []
    note = None
    if opts.evaluate:
        try:
            heldout = _heldout_dataset(state.config, state.tokenizer)
        except WakelabError as exc:
            heldout, note = None, f"held-out data unavailable ({exc}); showing the logged values"
        if heldout is None and note is None:
            note = "the run has no held-out split (data.heldout unset and data.heldout_fraction 0)"
        if heldout is not None:
            train = state.config.train
            blocks = opts.eval_max_blocks or train.eval_max_blocks
            measured = {
                label: (step, perplexity(state.model, heldout, train.batch_size, blocks, train.loss_chunk_tokens))
            }
            state.model = None  # one model in memory at a time
            other = load_trained(state_target, initial=not opts.initial)
            other_label = "initial" if not opts.initial else _state_label(other, False)
            other_step = 0 if not opts.initial else (other.step if other.step is not None else train.max_steps)
            measured[other_label] = (
                other_step,
                perplexity(other.model, heldout, train.batch_size, blocks, train.loss_chunk_tokens),
            )
            del other
            before = measured["initial"]
            after_label = next(k for k in measured if k != "initial")
            after = measured[after_label]
            rows = [
                {"when": "before", "state": "initial", "step": before[0], "perplexity": before[1],
                 "logged": logged.get("before"), "blocks": min(len(heldout), blocks)},
                {"when": "after", "state": after_label, "step": after[0], "perplexity": after[1],
                 "logged": logged.get("after"), "blocks": min(len(heldout), blocks)},
            ]  # fmt: skip
    if not rows and logged:
        rows = [{"when": k, "state": "initial" if k == "before" else "final", "perplexity": None, "logged": v}
                for k, v in logged.items()]  # fmt: skip
    lines = []
    if rows:
        sink.table(f"{label}/perplexity", rows)
        values = {r["when"]: (r["perplexity"] if r["perplexity"] is not None else r["logged"]) for r in rows}
        sink.metrics({f"perplexity/{k}": v for k, v in values.items()}, step)
        how = "recomputed" if rows[0]["perplexity"] is not None else "logged by the run"
        lines.append(f"perplexity held-out {_fmt(values.get('before'))} before -> {_fmt(values.get('after'))} after "
                     f"({how}" + (f", {rows[0]['blocks']} blocks)" if "blocks" in rows[0] else ")"))  # fmt: skip
    else:
        lines.append("perplexity not available: " + (note or "--no-eval and the run logged none"))
    if note and rows:
        lines.append(f"note       {note}")
    return {"rows": rows, "lines": lines}


# ----------------------------------------------------------------------------------------------------------------------
# Several runs


def compare_runs(targets: list[str], opts: AnalyzeOptions | None = None, warn: Warn | None = None) -> AnalysisReport:
    """Overlay several runs' loss curves (and with ``opts.recording``, displacement per step and freeze onset) and
    log the plots and tables to a new MLflow run tagged ``wakelab.analysis.kind=comparison``."""
    opts = opts or AnalyzeOptions()
    warnings: list[str] = []
    warn = _collecting(warn, warnings)
    if opts.recording:
        raise WakelabError(
            "--recording PATH names one recording; to compare runs, give --recording alone (each run's own)"
        )
    runs = [_resolve(t, warn) for t in targets]
    labels: list[str] = []
    for run in runs:
        name = run.label
        if name in labels:
            name = f"{name} ({run.run_id[:8] if run.run_id else run.run_dir})"
        labels.append(name)
    local = Path(opts.out) if opts.out else runs[0].run_dir / "analysis"
    client, dest, created = None, None, False
    if opts.mlflow:
        client = runs[0].client
        compared = ",".join(r.run_id or str(r.run_dir) for r in runs)
        tags = {"wakelab.analysis.kind": "comparison", "wakelab.analysis.compared_runs": compared}
        dest = _outer_run(client, tags, exclude=None)
        created = dest is None
        if created:
            dest = _new_run(client, runs[0], "comparison-" + "-vs-".join(labels)[:200], tags, None)
    sink = AnalysisSink(local, dest, client)
    report = AnalysisReport(local, dest, warnings=warnings)
    status = "FAILED"
    try:
        _compare_into(runs, labels, opts, sink, report, warn)
        status = "FINISHED"
    finally:
        try:
            if status == "FINISHED":
                sink.flush()
                for run in runs:
                    if dest and run.run_id:
                        run.client.set_tag(run.run_id, "wakelab.analysis.comparison_run", dest)
        finally:
            if created:
                client.set_terminated(dest, status)
    report.files = list(sink.files)
    return report


def _compare_into(
    runs: list[_Run], labels: list[str], opts: AnalyzeOptions, sink: AnalysisSink, report: AnalysisReport, warn: Warn
) -> None:
    lines = report.summary
    lines.append(f"comparison of {len(runs)} runs: " + ", ".join(labels))
    series, loss_rows, run_rows = {}, [], []
    for run, label in zip(runs, labels, strict=True):
        history = loss_history(run.run_id, run.run_dir, run.client)
        row = {"run": label, "run_id": run.run_id, "run_dir": str(run.run_dir)}
        if history is None:
            warn(f"run {label} has no loss history; left out of the loss plot")
        else:
            steps, losses, _ = history
            series[label] = (steps, losses)
            loss_rows += [
                {"run": label, "run_id": run.run_id, "step": s, "loss": v} for s, v in zip(steps, losses, strict=True)
            ]
            row.update(final_step=steps[-1], final_loss=losses[-1])
            lines.append(f"  {label}: loss {losses[0]:.4g} -> {losses[-1]:.4g} over steps {steps[0]}..{steps[-1]}")
        run_rows.append(row)
    fig = plots.curves(series, title="Training loss by run")
    sink.figure("comparison/loss_curves", fig)
    sink.table("comparison/loss_curves", loss_rows)
    report.figures["loss_curves"] = fig
    report.results["loss_series"] = {k: list(v) for k, v in series.items()}

    if opts.recording is not None:
        disp_series, onset_series, step_rows = {}, {}, []
        for run, label, row in zip(runs, labels, run_rows, strict=True):
            result = analyse_recording(default_recording(run.run_dir, run.run_id, run.client),
                                       freeze_threshold=opts.freeze_threshold)  # fmt: skip
            steps = [r["step"] for r in result.freeze_onset]
            disp_series[label] = (steps, [r["mean_displacement"] for r in result.freeze_onset])
            onset_series[label] = (steps, [r["unchanged_share"] for r in result.freeze_onset])
            step_rows += [{"run": label, "step": r["step"], "unchanged_share": r["unchanged_share"],
                           "mean_displacement": r["mean_displacement"]} for r in result.freeze_onset]  # fmt: skip
            row.update(recording=str(result.path), recording_complete=result.complete,
                       displacement_mean=result.displacement_summary["all"]["mean"],
                       frozen=result.freeze["frozen"], frozen_group=result.freeze["group"])  # fmt: skip
            lines.append(f"  {label}: recording {result.path} ({len(result.steps)} steps"
                         + ("" if result.complete else ", CUT SHORT") + f"), mean displacement "
                         f"{_fmt(result.displacement_summary['all']['mean'])}, "
                         f"{'frozen' if result.freeze['frozen'] else 'not frozen'}")  # fmt: skip
            if not result.complete:
                sink.tags({CUT_SHORT_TAG: "true"})
        fig_d = plots.curves(disp_series, title="Mean displacement per step by run",
                             ylabel="mean L2 distance per step (embedding units)")  # fmt: skip
        fig_o = plots.curves(onset_series, title="Freeze onset by run: rows unchanged from the previous step",
                             ylabel="share of rows unchanged")  # fmt: skip
        sink.figure("comparison/displacement_per_step", fig_d)
        sink.figure("comparison/freeze_onset", fig_o)
        sink.table("comparison/dynamics_per_step", step_rows)
        report.figures.update(displacement_per_step=fig_d, freeze_onset=fig_o)
    sink.table("comparison/runs", run_rows)
    for message in report.warnings:
        lines.append(f"warning    {message}")
    where = f"MLflow run {sink.run_id} under analysis/comparison/" if sink.run_id else "no MLflow run (--no-mlflow)"
    lines.append(f"logged to  {where}; files in {sink.local_dir}")
    sink.text("comparison/summary.txt", report.text)
    report.metric_names = sink.metric_names
