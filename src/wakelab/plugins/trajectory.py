"""Built-in ``trajectory`` plugin: watch the new tokens move while the run trains, in the MLflow UI.

Activate it with ``--plugin trajectory`` (the demo preset has it on; ``--set trajectory.enabled=false`` turns it
off). Every ``trajectory.every`` steps it projects the new rows onto a 2-D basis fitted once on the base rows (so a
row that does not move stays put) and logs a frame with ``mlflow.log_image(key="trajectory", step=...)``: the run's
image view gets a step slider that scrubs through training. At the end it logs, under ``trajectory/``:

- ``trajectory.html``: every frame with a step slider, trails, and on hover each word's nearest base tokens
  (self-contained: MLflow's artifact viewer opens it offline); ``trajectory.gif`` for slides;
- ``tokens.csv`` / ``tokens.json`` and an MLflow table ``tokens_table.json``: per new word its corpus frequency, norm,
  displacement, nearest base tokens at start and end, frozen or not, and the meaning probe's scores;
- ``probe.json`` and the metrics ``probe_kl_before/after`` and ``probe_substitution_before/after`` when the run has a
  constituents file (``init.constituents``; the demo's by default with the demo lexicon) and held-out text.

Which tokens get a trail (``trajectory.tokens``): ``auto`` (all up to ``max_tokens``, else a seeded sample), ``all``,
``sample:K``, or a words file; the rest are drawn as a density. Which of them get a label (``trajectory.labels``):
the words with a meaning word, then the top movers, or a words file first; labels never overlap, the rest show on
hover. With constituents (``init.constituents``) each tracked word's meaning word is drawn and its cosine distance to
it charted; the page offers two fixed projections (``trajectory.projection`` picks the default). ``wakelab analyze
RUN --recording`` draws the same pictures from a recording (and can pick the top movers).
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

import torch
from pydantic import Field

import wakelab


class TrajectoryConfig(wakelab.PluginConfig):
    """The `trajectory` plugin: how often to capture a frame, which tokens to draw, and what to log."""

    enabled: bool = Field(True, description="Set false to keep the plugin loaded (e.g. by a preset) but inactive.")
    every: int = Field(10, ge=1, description="Capture a frame every N optimizer steps (and the start and the end).")
    tokens: str = Field(
        "auto", description="Tokens drawn with labels and trails: auto, all, sample:K, or a words file (one a line)."
    )
    max_tokens: int = Field(40, ge=1, description="`auto` draws all new tokens up to this many, else a sample.")
    backdrop: int = Field(2000, ge=0, description="Base tokens drawn as the grey backdrop (a seeded sample).")
    neighbours: int = Field(5, ge=0, description="Nearest base tokens listed per tracked token (hover, table).")
    table_neighbours: bool = Field(
        True,
        description=(
            "List every new word's nearest base tokens at start and end in the per-token table: a chunked search "
            "(memory O(8192 x d)) of 2 x new x base x d multiply-adds, 23 T at P1's size: seconds on a GPU, "
            "several minutes on a CPU. False: the table without those two columns."
        ),
    )
    seed: int = Field(0, description="Seed of the token sample, the backdrop and the probe's contexts.")
    log_frames: bool = Field(True, description="Log each frame as an MLflow image with its step (the image slider).")
    html: bool = Field(True, description="Write and log trajectory.html.")
    gif: bool = Field(True, description="Write and log trajectory.gif.")
    probe: bool = Field(True, description="Run the meaning probe before and after training (needs constituents).")
    probe_contexts: int = Field(3, ge=1, description="Held-out contexts per probed word.")
    probe_words: int = Field(32, ge=1, description="At most this many constituents words are probed.")
    max_frames: int = Field(400, ge=2, description="Frames kept in the HTML page (evenly spread when there are more).")
    projection: Literal["focus", "base"] = Field(
        "focus",
        description="The page's default projection (both are fitted once and offered): focus = PCA of the base rows "
        "nearest the new tokens and their meaning words; base = PCA of all base rows.",
    )
    labels: str = Field(
        "auto",
        description="Words labelled first: auto (words with a meaning word, then the top movers) or a words file; "
        "labels never overlap, the rest show on hover.",
    )
    max_labels: int = Field(20, ge=0, description="At most this many labels per frame on the page (fewer when "
                            "they would overlap).")  # fmt: skip


def _log(message: str) -> None:
    wakelab.log(f"trajectory: {message}")


def _warn(message: str) -> None:
    wakelab.warn(f"trajectory: {message}")


class _Watch:
    def __init__(self, run, builder, start_rows, probe, probe_before):
        self.run = run
        self.builder = builder
        self.start_rows = start_rows
        self.probe = probe
        self.probe_before = probe_before
        self.client = None
        self.frame_errors = 0
        self.stats: dict[str, float] = {"hook_seconds": 0.0, "frames": 0, "start_seconds": 0.0, "end_seconds": 0.0}


def _new_rows(rows) -> torch.Tensor:
    """The new rows as they are now: a view (no copy) when one tensor holds them; copy it to keep it."""
    return rows.values(range(rows.num_base, rows.num_total), share=True)


def _frame(watch: _Watch, step: int, add: bool = True) -> None:
    if add:
        watch.builder.add(step, _new_rows(watch.run.rows))
    watch.stats["frames"] += 1
    cfg = watch.run.config.trajectory
    if not cfg.log_frames or watch.run.run_id is None or watch.frame_errors >= 3:
        return
    try:
        if watch.client is None:
            from mlflow import MlflowClient

            watch.client = MlflowClient()
        traj = watch.builder.result()
        wakelab.log_trajectory_frame(watch.client, watch.run.run_id, wakelab.trajectory_frame(traj, len(traj) - 1),
                                     step)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a frame the tracking store did not take must not stop training
        watch.frame_errors += 1
        wakelab.warn(f"trajectory: frame at step {step} not logged: {exc}")


class Plugin:
    """The trajectory plugin, one instance per run's plugin manager: it holds that run's watch (frames, probe)."""

    def __init__(self) -> None:
        self.watch: _Watch | None = None  # the run's watch; None when this run draws nothing

    @wakelab.hookimpl
    def config_section(self):
        return "trajectory", TrajectoryConfig

    @wakelab.hookimpl
    def check_config(self, config):
        """Refuse a token choice the plugin cannot draw, before anything is written."""
        spec = str(config.trajectory.tokens).strip()
        if not config.trajectory.enabled or spec in ("auto", "all"):
            return
        kind, _, count = spec.partition(":")
        if kind == "top":
            raise wakelab.ConfigError(
                f"trajectory.tokens={spec}: the top movers are known only once training is over; use sample:K or a "
                "words file live, or top:K with `wakelab analyze RUN --recording --tokens top:K`"
            )
        if kind == "sample":
            if not count.isdigit() or int(count) < 1:
                raise wakelab.ConfigError(f"trajectory.tokens={spec}: K must be a whole number >= 1 (e.g. sample:20)")
            return
        if not os.path.isfile(os.path.expanduser(spec)):
            raise wakelab.ConfigError(
                f"trajectory.tokens={spec}: not auto, all, sample:K or an existing words file (one word a line)"
            )

    @wakelab.hookimpl
    def on_run_start(self, run):
        """Fit the projection on the base rows, pick the tokens, probe the untrained rows and log the first frame."""
        self.watch = None
        cfg = run.config.trajectory
        if not cfg.enabled or not run.is_main_process:
            return
        started = time.perf_counter()
        rows = run.rows
        if len(rows.new_ids) == 0:
            _log("this run adds no new tokens; nothing to draw")
            return
        base_rows = rows.values(range(rows.num_base), share=True)  # a view of the weights: no copy of the base rows
        builder = wakelab.start_watch(
            base_rows, run.tokenizer, rows.new_ids.tolist(), _new_rows(rows), int(run.start_step), tokens=cfg.tokens,
            max_tokens=cfg.max_tokens, backdrop=cfg.backdrop, neighbours=cfg.neighbours, seed=cfg.seed,
            warn=_warn, constituents=wakelab.trajectory_constituents(run.config), projection=cfg.projection,
            labels=cfg.labels,
        )  # fmt: skip
        probe, before = None, None
        if cfg.probe:
            probe = wakelab.probe_setup(
                run.config,
                run.tokenizer,
                rows.num_base,
                contexts=cfg.probe_contexts,
                max_words=cfg.probe_words,
                seed=cfg.seed,
                warn=_warn,
            )
            if probe is not None:
                before = wakelab.meaning_probe(run.model, probe)
        watch = _Watch(run, builder, _new_rows(rows).detach().float().clone(), probe, before)
        self.watch = watch
        _frame(watch, int(run.start_step), add=False)  # start_watch captured it
        watch.stats["start_seconds"] = time.perf_counter() - started
        _log(f"drawing {len(builder.tracked)} of {len(rows.new_ids)} new tokens every {cfg.every} step(s)"
             + (f"; probing {len(probe.words)} words" if probe else ""))  # fmt: skip

    @wakelab.hookimpl
    def on_step_end(self, state):
        """Capture a frame on every ``trajectory.every``-th step."""
        watch = self.watch
        if watch is None or state.step % watch.run.config.trajectory.every:
            return
        started = time.perf_counter()
        try:
            _frame(watch, int(state.step))
        finally:
            watch.stats["hook_seconds"] += time.perf_counter() - started

    @wakelab.hookimpl
    def on_run_end(self, run, status):
        """Write and log the page, the GIF, the per-token table and the probe's scores (finished runs only)."""
        watch = self.watch
        if watch is None or watch.run is not run:
            return
        self.watch = None
        if status != "FINISHED":
            return
        started = time.perf_counter()
        cfg = run.config.trajectory
        step = max(watch.builder.steps[-1], int(run.config.train.max_steps))
        if watch.builder.steps[-1] < step:
            _frame(watch, step)
        after = wakelab.meaning_probe(run.model, watch.probe) if watch.probe is not None else None
        if cfg.table_neighbours:
            _say_table_cost(run.rows)
        with wakelab.write_point(  # a full disk: one line; the folder is whole (the one before) or absent
            "trajectory", run.output_dir / "trajectory", what="the trajectory",
            intact=lambda: f"the trained rows in {run.output_dir / 'final'} and every checkpoint are intact",
            then=f"wakelab analyze {run.output_dir} --recording (draws the trajectory again from a recording)",
        ):  # fmt: skip
            out = wakelab.finish_watch(
                watch.builder, run.output_dir / "trajectory", start_rows=watch.start_rows,
                end_rows=_new_rows(run.rows), corpus_ids=run.corpus_ids, probe_before=watch.probe_before,
                probe_after=after, html=cfg.html, gif=cfg.gif, max_frames=cfg.max_frames,
                fewer_frames_hint="raise trajectory.every or lower trajectory.max_frames",
                label_max=cfg.max_labels, table_neighbours=cfg.table_neighbours,
            )  # fmt: skip
        for message in out.messages:
            _log(message)
        for path in out.files:
            run.log_artifact(path, "trajectory")
        watch.stats["end_seconds"] = time.perf_counter() - started
        metrics: dict[str, Any] = dict(out.metrics)
        metrics["trajectory_ms_per_step"] = 1000.0 * watch.stats["hook_seconds"] / max(step - int(run.start_step), 1)
        run.log_metrics(metrics, step)
        if run.run_id is not None:
            try:
                from mlflow import MlflowClient

                client = watch.client or MlflowClient()
                wakelab.log_token_table(client, run.run_id, out.table, "trajectory/tokens_table.json")
            except Exception as exc:  # noqa: BLE001 - the CSV is logged; the UI table is a convenience
                _warn(f"the per-token table was not logged as an MLflow table: {exc}")
        _log(f"wrote {', '.join(p.name for p in out.files)} to {out.folder}")


#: Above this many multiply-adds the table's neighbour search is announced: about a minute on 2 CPU cores.
TABLE_COST_SAID = 2e12


def _say_table_cost(rows) -> None:
    """Say before a long search what it costs and how to skip it: at P1's size it is minutes of CPU at a run's end."""
    new, base = len(rows.new_ids), rows.num_base
    cost = 2 * new * base * rows.dim
    if cost >= TABLE_COST_SAID:
        _log(f"per-token table: the nearest base tokens of {new:,} new words at start and end, against {base:,} "
             f"base rows ({cost:.1e} multiply-adds: seconds on a GPU, minutes on a CPU); "
             "trajectory.table_neighbours=false leaves those two columns out")  # fmt: skip
