"""The sweep's comparison: per-child summaries, a table in Markdown and HTML, and plots."""

from __future__ import annotations

import csv
import gc
import html
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..logs import warn
from ..rows import StackedRows
from ..storage.writepoint import published_dir, write_point
from ..vocab import word_token_id
from .plan import Child, SweepPlan

Log = Callable[[str], None]

COMPARISON_DIR = "comparison"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token as the word it spells: decoded, stripped, lower case."""
    return [tokenizer.decode([int(i)]).strip().lower() for i in ids]


def hit_rates(weight: torch.Tensor, tokenizer, num_base: int, constituents: dict[str, list[str]], k: int) -> dict:
    """Share of the constituents' new words whose top-k base neighbours hold the meaning word (or a part)."""
    from ..analysis.embeddings import nearest_neighbours

    vocab = tokenizer.get_vocab()
    token_of = {w: word_token_id(vocab, w) for w in constituents}
    words = [w for w in constituents if token_of[w] is not None and token_of[w] >= num_base]
    if not words:
        return {"words": 0, "skipped": len(constituents), "hit_meaning": None, "hit_any": None, "details": []}
    ids = [token_of[w] for w in words]
    neighbours = nearest_neighbours(weight, ids, range(num_base), k=k)
    details, meaning_hits, any_hits = [], 0, 0
    for word, found in zip(words, neighbours, strict=True):
        texts = token_texts(tokenizer, [i for i, _ in found])
        meaning, *parts = (w.lower() for w in constituents[word])
        hit_meaning = meaning in texts
        hit_any = hit_meaning or any(p in texts for p in parts)
        meaning_hits += hit_meaning
        any_hits += hit_any
        details.append(
            {
                "word": word,
                "meaning": meaning,
                "parts": parts,
                "neighbours": texts,
                "hit_meaning": hit_meaning,
                "hit_any": hit_any,
            }
        )
    return {
        "words": len(words),
        "skipped": len(constituents) - len(words),
        "hit_meaning": meaning_hits / len(words),
        "hit_any": any_hits / len(words),
        "details": details,
    }


def child_states(child: Child) -> tuple[StackedRows, StackedRows, Any, int]:
    """The child's embedding rows right after init and at the end (float32), its tokenizer and base size.

    Both ends share the base rows in place. The final new rows are the saved file's when it holds exactly the new
    rows in order (``tokens`` and ``mask`` runs), and the initial ones stay in the loaded matrix: no copy of either.
    """
    from safetensors.torch import load_file

    from ..run.state import load_trained, rows_file

    state = load_trained(child.output_dir, initial=True)
    rows = state.rows
    num_base = rows.num_base
    base = rows.values(range(num_base), share=True)  # frozen: the same at both ends, so read in place
    new_ids = range(num_base, rows.num_total)
    path, _ = rows_file(child.output_dir)
    saved = load_file(str(path))
    ids = saved["token_ids"].long()
    if "head_rows" not in saved and torch.equal(ids, torch.arange(num_base, rows.num_total)):
        initial = StackedRows(base, rows.values(new_ids, share=True))
        final = StackedRows(base, saved["rows"].float())
    else:  # other rows trained too, or an untied head's own: the model's rows after loading them
        initial = StackedRows(base, rows.values(new_ids, share=True).float().clone())
        rows.load_rows(ids, saved["rows"])
        final = StackedRows(base, rows.values(new_ids, share=True).float().clone())
    tokenizer = state.tokenizer
    del state, rows, saved
    gc.collect()
    return initial, final, tokenizer, num_base


def summarise_child(client, child: Child, plan: SweepPlan, log: Log) -> dict[str, Any]:
    """Everything the comparison shows of one finished child; hit rates also go to the child run as metrics."""
    from ..analysis.report import loss_history

    summary: dict[str, Any] = {"loss": None, "norm_curve": None, "neighbours": None}
    history = loss_history(child.run_id, child.output_dir, client)
    if history is not None:
        summary["loss"] = (history[0], history[1])
    norms = sorted(client.get_metric_history(child.run_id, "new_row_norm"), key=lambda m: (m.step, m.timestamp))
    steps = {m.step: m.value for m in norms}
    initial, final, tokenizer, num_base = child_states(child)
    last_step = max([child.config.train.max_steps, *steps])
    init_norm = float(initial[num_base:].norm(dim=1).mean()) if initial.shape[0] > num_base else math.nan
    steps[0] = init_norm
    summary["norm_curve"] = (sorted(steps), [steps[s] for s in sorted(steps)])
    summary["base_mean_norm"] = float(initial[:num_base].norm(dim=1).mean())
    summary["new_row_norm_init"] = init_norm
    summary["new_row_norm_final"] = child.metrics.get("new_row_norm", float(final[num_base:].norm(dim=1).mean()))
    logged = client.get_run(child.run_id).data.metrics  # the trajectory plugin's meaning probe, when it ran
    summary["probe"] = {k: logged[k] for k in PROBE_KEYS if k in logged}
    summary["init_seconds"] = logged.get("init/seconds")
    if plan.evaluate:
        summary["evaluate"] = evaluate_child(child, log)
    if child.config.init.from_embeddings:
        log(
            f"warning: {child.label}: init.from_embeddings is set; step-0 values are those of the init before the "
            "restore"
        )
    if plan.constituents:
        at_init = hit_rates(initial, tokenizer, num_base, plan.constituents, plan.top_k)
        at_end = hit_rates(final, tokenizer, num_base, plan.constituents, plan.top_k)
        summary["hits"] = {"step0": at_init, "final": at_end}
        if at_init["words"]:
            client.log_batch(child.run_id, metrics=_hit_metrics(at_init, 0) + _hit_metrics(at_end, last_step))
        if at_init["skipped"]:
            log(
                f"warning: {child.label}: {at_init['skipped']} constituents words are not new tokens of this run "
                "(already single tokens) and are left out of its hit rates"
            )
    return summary


def evaluate_child(child: Child, log: Log) -> dict[str, Any]:
    """``wakelab evaluate`` on one child against the base (a run nested under the child): the comparison's figures."""
    from ..analysis.evaluate.report import EvaluateOptions, evaluate_run

    report = evaluate_run(str(child.output_dir), EvaluateOptions(attach_outer=False), warn)
    log(f"{child.label}: evaluated ({report.run_id}): {report.results['verdict']}")
    r = report.results
    trained, base = r["profiles"].get("trained", {}), r["profiles"].get("base", {})
    after = (r["class_split"].get("after") or {}).get("new") or {}
    cost = r["reference_cost"] or {}
    probe = r.get("probe") or {}
    return {"eval_coined_per_1k": trained.get("coined_per_1k"),
            "eval_corpus_coined_per_1k": r["corpus"]["coined_per_1k"],
            "eval_delta_corpus": trained.get("delta_corpus"), "eval_base_delta_corpus": base.get("delta_corpus"),
            "eval_new_ppl_after": after.get("perplexity"), "eval_reference_loss_increase": cost.get("loss_increase"),
            "probe_auc_before": probe.get("probe_auc_before"), "probe_auc_after": probe.get("probe_auc_after"),
            "eval_run_id": report.run_id}  # fmt: skip


def _hit_metrics(rates: dict, step: int) -> list:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    return [Metric(f"neighbour_hit_{kind}", float(rates[f"hit_{kind}"]), stamp, step) for kind in ("meaning", "any")]


COLUMNS = (
    ("child", "child"),
    ("status", "status"),
    ("heldout_alias_mse_before", "hidden dist step 0"),
    ("heldout_perplexity_before", "ppl before"),
    ("heldout_perplexity_after", "ppl after"),
    ("final_loss", "final loss"),
    ("new_row_norm_init", "new-row norm step 0"),
    ("new_row_norm_final", "new-row norm end"),
    ("base_mean_norm", "base-row norm"),
    ("new_row_displacement", "displacement"),
    ("hit_meaning_step0", "meaning@k step 0"),
    ("hit_meaning_final", "meaning@k end"),
    ("hit_any_step0", "meaning/part@k step 0"),
    ("hit_any_final", "meaning/part@k end"),
    ("hit_words", "words scored"),
    ("probe_kl_before", "probe KL step 0"),
    ("probe_kl_after", "probe KL end"),
    ("probe_substitution_after", "substitution end"),
    ("init_seconds", "init s"),
    ("probe_auc_before", "probe AUC step 0"),
    ("probe_auc_after", "probe AUC end"),
    ("eval_coined_per_1k", "coined/1k (evaluate)"),
    ("eval_corpus_coined_per_1k", "corpus coined/1k"),
    ("eval_delta_corpus", "Delta to corpus"),
    ("eval_base_delta_corpus", "base Delta to corpus"),
    ("eval_new_ppl_after", "ppl new-word targets"),
    ("eval_reference_loss_increase", "ordinary-text cost (nats)"),
    ("train_seconds", "seconds"),
    ("run_id", "run id"),
    ("error", "error"),
)

PROBE_KEYS = ("probe_kl_before", "probe_kl_after", "probe_substitution_after", "probe_auc_before", "probe_auc_after")


def comparison_row(child: Child) -> dict[str, Any]:
    row: dict[str, Any] = {key: None for key, _ in COLUMNS}
    row.update(child=child.label, status=child.status, run_id=child.run_id, error=child.error, value=child.text)
    for key in (
        "heldout_alias_mse_before",
        "heldout_perplexity_before",
        "heldout_perplexity_after",
        "new_row_displacement",
        "train_seconds",
    ):
        row[key] = child.metrics.get(key)
    summary = child.summary
    if summary.get("loss"):
        row["final_loss"] = summary["loss"][1][-1]
    for key in ("new_row_norm_init", "new_row_norm_final", "base_mean_norm", "init_seconds"):
        row[key] = summary.get(key)
    row.update(summary.get("probe") or {})
    row.update({k: v for k, v in (summary.get("evaluate") or {}).items() if k in dict(COLUMNS) and v is not None})
    hits = summary.get("hits")
    if hits:
        for when in ("step0", "final"):
            for kind in ("meaning", "any"):
                row[f"hit_{kind}_{when}"] = hits[when][f"hit_{kind}"]
        row["hit_words"] = hits["final"]["words"]
    return row


def _fmt(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if key.startswith("hit_") and key != "hit_words":
        return f"{value:.0%}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table_markdown(rows: list[dict], plan: SweepPlan, shown: tuple[str, ...]) -> str:
    header = [label.replace("@k", f"@{plan.top_k}") for key, label in COLUMNS if key in shown]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in rows:
        cells = [_fmt(key, row.get(key)).replace("|", "\\|") for key, _ in COLUMNS if key in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_html(rows: list[dict], plan: SweepPlan, shown: tuple[str, ...]) -> str:
    """The comparison table as one ``<table>`` element (the page around it is :mod:`.page`'s)."""
    header = "".join(
        f"<th>{html.escape(label.replace('@k', f'@{plan.top_k}'))}</th>" for key, label in COLUMNS if key in shown
    )
    body = []
    for row in rows:
        style = "" if row["status"] == "FINISHED" else ' style="color:#b00"'
        cells = "".join(f"<td>{html.escape(_fmt(key, row.get(key)))}</td>" for key, _ in COLUMNS if key in shown)
        body.append(f"<tr{style}>{cells}</tr>")
    return f"<table><tr>{header}</tr>{''.join(body)}</table>"


def comparison_html(rows: list[dict], plan: SweepPlan, shown: tuple[str, ...], notes: list[str], out: Path,
                    log: Log) -> str:  # fmt: skip
    """The comparison page: the table (first column fixed), the children's trajectories side by side in one shared
    projection under one slider (refused in one line when the children's base models differ), the plots embedded."""
    from .page import ChildTrajectory, comparison_page, side_by_side

    done = [ChildTrajectory(c.label, c.output_dir, str(c.config.model.name_or_path))
            for c in plan.children if c.status == "FINISHED"]  # fmt: skip
    runs, refused = side_by_side(done, warn) if done else ([], "no child finished: nothing to show side by side")
    if refused:
        log(f"warning: {refused}")
    plots = [out / f"{name}.png" for name in PLOTS]
    return comparison_page(f"Sweep over {plan.canonical}", table_html(rows, plan, shown), notes, plots, runs, refused)


PLOTS = ("loss_curves", "perplexity", "new_row_norm", "hit_rates")


def notes_for(plan: SweepPlan) -> list[str]:
    notes = []
    missing = [c for c in plan.children if c.status != "FINISHED"]
    if missing:
        notes.append("missing (no results): " + "; ".join(f"{c.label} {c.status}: {c.error}" for c in missing))
    if plan.constituents:
        notes.append(
            f"hit rates: share of the {len(plan.constituents)} constituents words whose top-{plan.top_k} base-token "
            "neighbours (cosine) hold the meaning word (meaning@k), or the meaning word or a word it blends "
            "(meaning/part@k); step 0 = right after init (subword init starts a word at its own pieces, so its "
            "step-0 neighbours partly reflect the init), end = after training."
        )
        if plan.not_in_lexicon:
            notes.append(f"left out of the hit rates (not in the lexicon): {', '.join(plan.not_in_lexicon)}")
    else:
        notes.append("no constituents file (--constituents / init.constituents): no hit rates")
    return notes


def compare(client, plan: SweepPlan, parent_id: str, log: Log) -> tuple[Path, str]:
    """Summarise every finished child, write the comparison files and plots, and log them to the parent."""
    out = plan.root / COMPARISON_DIR
    for child in plan.children:
        if child.status != "FINISHED":
            continue
        try:
            child.summary = summarise_child(client, child, plan, log)
        except Exception as exc:  # noqa: BLE001 - a child's analysis failing leaves a gap, not a lost sweep
            warn(f"could not read back {child.label} for the comparison: {_one_line(exc)}")
            child.summary = {}
    rows = [comparison_row(c) for c in plan.children]
    shown = tuple(
        key
        for key, _ in COLUMNS
        if key != "run_id" and (key in ("child", "status") or any(r.get(key) is not None for r in rows))
    )
    notes = notes_for(plan)
    markdown = table_markdown(rows, plan, shown)
    meta = {
        "key": plan.canonical,
        "values": [c.text for c in plan.children],
        "parent_run_id": parent_id,
        "top_k": plan.top_k,
        "constituents": str(plan.constituents_path) if plan.constituents_path else None,
        "constituents_not_in_lexicon": plan.not_in_lexicon,
        "missing": [c.label for c in plan.children if c.status != "FINISHED"],
        "notes": notes,
        "children": rows,
    }
    # A full disk: one line, and the comparison folder whole (the one before) or absent, never half-written.
    with (
        write_point(
            "sweep-comparison",
            out,
            intact=f"every child's run, checkpoints and final rows are intact; {out} is as it was",
            then=f"wakelab sweep --resume {parent_id}",
        ),
        published_dir(out) as folder,
    ):
        (folder / "comparison.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        with (folder / "comparison.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[key for key, _ in COLUMNS] + ["value"])
            writer.writeheader()
            writer.writerows(rows)
        (folder / "comparison.md").write_text(
            f"# Sweep over `{plan.canonical}`\n\n{markdown}\n" + "".join(f"- {n}\n" for n in notes)
        )
        neighbours = {
            c.label: {when: c.summary["hits"][when]["details"] for when in ("step0", "final")}
            for c in plan.children
            if c.summary.get("hits")
        }
        (folder / "neighbours.json").write_text(json.dumps(neighbours, indent=1, ensure_ascii=False) + "\n")
        write_plots(plan, folder)
        (folder / "comparison.html").write_text(
            comparison_html(rows, plan, shown, notes, folder, log), encoding="utf-8"
        )
    client.log_artifacts(parent_id, str(out), COMPARISON_DIR)
    return out, markdown


def write_plots(plan: SweepPlan, out: Path) -> None:
    from ..analysis import plots

    done = [c for c in plan.children if c.status == "FINISHED" and c.summary]
    missing = [c.label for c in plan.children if c not in done]
    suffix = f"\n(missing: {', '.join(missing)})" if missing else ""

    fig = plots.curves(
        {c.label: c.summary["loss"] for c in done if c.summary.get("loss")},
        f"Training loss per child ({plan.canonical}){suffix}",
    )
    plots.save_figure(fig, out / "loss_curves.png")

    fig = plots.curves(
        {c.label: c.summary["norm_curve"] for c in done if c.summary.get("norm_curve")},
        f"Mean new-row norm (step 0 = right after init){suffix}",
        ylabel="mean L2 norm of the new rows",
    )
    base = [c.summary["base_mean_norm"] for c in done if c.summary.get("base_mean_norm") is not None]
    if base:
        ax = fig.axes[0]
        ax.axhline(base[0], color="gray", linestyle="--", label="mean base-row norm")
        ax.legend(loc="best")
    plots.save_figure(fig, out / "new_row_norm.png")

    labels = [c.label for c in done]
    before = [c.metrics.get("heldout_perplexity_before", math.nan) for c in done]
    after = [c.metrics.get("heldout_perplexity_after", math.nan) for c in done]
    fig = _bars(
        labels,
        {"before training": before, "after training": after},
        f"Held-out perplexity{suffix}",
        "perplexity (log scale)",
        log_scale=True,
    )
    plots.save_figure(fig, out / "perplexity.png")

    if plan.constituents:
        series: dict[str, list[float]] = {}
        for kind, name in (("meaning", "meaning word"), ("any", "meaning word or a part")):
            for when, when_name in (("step0", "step 0"), ("final", "end")):
                series[f"{name}, {when_name}"] = [
                    (c.summary.get("hits") or {}).get(when, {}).get(f"hit_{kind}") or 0.0 for c in done
                ]
        fig = _bars(
            labels,
            series,
            f"Nearest-neighbour hit rate (top {plan.top_k} base tokens){suffix}",
            "share of words with a hit",
            ylim=(0, 1.05),
            percent=True,
        )
        plots.save_figure(fig, out / "hit_rates.png")


def _bars(
    labels: list[str],
    series: dict[str, list[float]],
    title: str,
    ylabel: str,
    *,
    log_scale: bool = False,
    ylim: tuple[float, float] | None = None,
    percent: bool = False,
):
    import numpy as np

    from ..analysis.plots import new_figure

    fig, (ax,) = new_figure(width=max(7.0, 1.6 * max(len(labels), 1) * max(len(series), 1) / 2))
    x = np.arange(len(labels))
    width = 0.8 / max(len(series), 1)
    for index, (name, values) in enumerate(series.items()):
        bars = ax.bar(x + (index - (len(series) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(
            bars,
            labels=[("—" if math.isnan(v) else f"{v:.0%}" if percent else f"{v:.3g}") for v in values],
            fontsize=8,
            padding=2,
        )
    ax.set_xticks(x, labels)
    ax.set_title(title)
    ax.set_xlabel("child run")
    finite = [v for vs in series.values() for v in vs if not math.isnan(v) and v > 0]
    if log_scale and finite and max(finite) / min(finite) > 5:  # e.g. 766 -> 30; a narrow range reads better linear
        from matplotlib.ticker import ScalarFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
    elif log_scale:
        ylabel = ylabel.replace(" (log scale)", "")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend(loc="best", fontsize=8)
    return fig
