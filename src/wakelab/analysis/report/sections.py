"""The sections of a report: static geometry, dynamics, samples and perplexity, each to a sink."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from ...errors import WakelabError
from .. import plots
from ..dynamics.from_recording import DynamicsResult, describe
from ..embeddings import isotropy, nearest_neighbours, row_norms, summarise_norms
from ..sink import AnalysisSink
from .target import (
    CUT_SHORT_TAG,
    NORM_STATS,
    AnalyzeOptions,
    Warn,
    _heldout_dataset,
    _logged_perplexity,
    _Run,
    _state_label,
)


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
    weight = rows.stacked()  # read in place: a copy of the whole matrix was 1.35 GiB at P1
    num_base, num_total = rows.num_base, rows.num_total
    out: dict[str, Any] = {"notes": []}

    norms_of_rows = row_norms(weight)  # one pass over the matrix for the statistics and the histogram
    norms = summarise_norms(norms_of_rows, num_base)
    sink.table(f"{prefix}/norms", [{"group": g, **s} for g, s in norms.items()])
    sink.figure(f"{prefix}/norm_histogram", plots.norm_histogram(norms_of_rows[:num_base], norms_of_rows[num_base:]))
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


def _samples(state, opts: AnalyzeOptions, sink: AnalysisSink, label: str, warn: Warn) -> list[str]:
    """A few continuations of held-out prompts that hold new words: a table (and text) the MLflow UI shows."""
    from ...data.corpus import resolve_data_paths
    from ..generation import samples

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
    from ...run.evaluation import perplexity
    from ...run.state import load_trained

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
            # One model in memory at a time. The rows hold the model's embedding matrix too (1.35 GiB at P1, read
            # back as one matrix): with them kept, loading the other state held two and analyze peaked at 1.26x
            # the training run's peak.
            state.model = state.rows = None
            gc.collect()
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
