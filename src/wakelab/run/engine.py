"""A run, top to bottom: config -> model -> new tokens -> init -> trainable rows -> data -> Trainer, in MLflow.

Read ``run`` from top to bottom: its phases (prepare, open, build, train, finish, then close on every exit) are the
methods of ``_Run`` in that order, and each step in them is one call into the module that owns it. The engine knows
no plugin by name: it calls the hooks and lets the active plugins answer.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import RunConfig
from ..data import corpus as data_mod
from ..data.corpus import resolve_data_paths, token_cache_dir
from ..data.span import training_span
from ..errors import ConfigError, PluginError, WakelabError
from ..hooks.context import RunContext
from ..inits.aliasing import heldout_alias_distance
from ..inits.subwords import word_pieces
from ..logs import log, warn
from ..loss import SMALL_LOGITS
from ..rows import RowAccess, setup_trainable_rows
from ..storage import checkpoints
from ..storage.writepoint import WriteFailed, published_dir, published_file, write_point
from ..tracking import runs as tracking
from ..vocab import corpus_stats
from . import build, logged_model, merge, ranks, sharding, stopping
from .evaluation import perplexity

RUN_FILE = "wakelab_run.json"


@dataclass
class RunResult:
    run_id: str
    experiment_id: str
    output_dir: Path
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    tracking_uri: str = ""


def prepare_output_dir(config: RunConfig, overwrite: bool, resume: bool) -> Path:
    """The run's directory; one that holds another run's checkpoints is refused unless told otherwise."""
    out = config.resolved_output_dir
    previous = sorted(out.glob("checkpoint-*")) if out.is_dir() else []
    owned = (out / RUN_FILE).exists()
    if (previous or owned) and not (overwrite or resume):
        what = f"{len(previous)} checkpoint(s)" if previous else "another run"
        raise ConfigError(
            f"output directory {out} already holds {what}; resume it (wakelab resume {out}), pass --overwrite, "
            "or choose another --output-dir"
        )
    if overwrite and out.is_dir():
        for child in [*previous, out / checkpoints.STAGING]:
            shutil.rmtree(child, ignore_errors=True)
        for name in (RUN_FILE, "final", "vocab_report.json", "config.yaml", build.INITIAL_ROWS):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if resume and out.is_dir():  # what a failed checkpoint write left (a full disk, say): resume writes it afresh
        shutil.rmtree(out / checkpoints.STAGING, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def new_row_metrics(rows: RowAccess, initial: Path | None, chunk: int = 8192) -> dict[str, float]:
    """Mean new-row norm and mean displacement from the rows as init left them (``initial``: the run's
    ``initial_rows.safetensors``), a chunk of rows at a time.

    Read from the file rather than kept: a copy held for the whole run would cost as much as the new rows themselves
    (345 MiB at P1's 44,195 x 2048). The file holds the rows before the split cast them to ``train.rows_dtype``, so
    they are cast the same way here, which gives exactly the values the training started from.
    """
    if rows.num_total == rows.num_base:
        return {}
    ids = rows.new_ids
    norms, moved = [], []
    with contextlib.ExitStack() as stack:
        start_rows = None
        if initial is not None and initial.exists():
            from safetensors import safe_open

            start_rows = stack.enter_context(safe_open(str(initial), framework="pt")).get_slice("rows")
        for start in range(0, ids.numel(), chunk):
            current = rows.values(ids[start : start + chunk], share=True).float()
            norms.append(current.norm(dim=1))
            if start_rows is not None:
                begun = start_rows[start : start + chunk].to(rows.dtype).float().to(current.device)
                moved.append((current - begun).norm(dim=1))
    metrics = {"new_row_norm": float(torch.cat(norms).mean())}
    if moved:
        metrics["new_row_displacement"] = float(torch.cat(moved).mean())
    return metrics


@stopping.handles_signals  # SIGTERM/SIGINT/SIGHUP: checkpoint after the step in flight, end KILLED
@ranks.one_error_for_all  # torchrun: a pre-flight failure on any rank is raised on every rank
def run(
    config: RunConfig,
    *,
    overwrite: bool = False,
    resume_from: str | None = None,
    progress: bool = True,
    cwd: Path | None = None,
    run_id: str | None = None,
) -> RunResult:
    """Build the run the config describes and train it inside one MLflow run.

    ``run_id`` attaches to an MLflow run that already exists (a sweep's child); without it the run is the one
    ``MLFLOW_RUN_ID`` names (``mlflow run``), the resumed run's, or a new one.
    """
    phases = _Run(config, cwd, progress)
    phases.prepare(resume_from)  # every input checked; nothing written yet
    phases.open(overwrite, run_id)  # the output directory and the MLflow run
    try:
        phases.build()  # the model, its trainable rows and the data, logged; held-out perplexity before
        phases.train()
        phases.finish()  # final rows, held-out perplexity after, metrics, the logged model
    except BaseException as exc:  # noqa: BLE001 - every exit must close the MLflow run with the right status
        phases.error = exc
        raise
    finally:
        phases.close()  # FINISHED, FAILED or KILLED, never RUNNING
    return phases.result()


class _Run:
    """The phases of :func:`run`, in the order it calls them; what one phase makes, the next reads from ``self``.

    Under torchrun every rank runs every phase; rank 0 alone writes the run's files and logs to MLflow.
    """

    def __init__(self, config: RunConfig, cwd: Path | None, progress: bool):
        self.started = time.monotonic()
        self.config = config
        self.cwd = cwd
        self.progress = progress
        self.error: BaseException | None = None
        self.incomplete: tracking.TrackingIncomplete | None = None
        self.run_ctx: RunContext | None = None
        self.result_metrics: dict[str, float] = {}
        # Made by prepare():
        self.rank = 0
        self.lexicon_path: Path | None = None
        self.corpus_path: Path | None = None
        self.heldout_path: Path | None = None
        self.prepared: build.Prepared | None = None
        self.starts_from_other_run = False
        self.resume_from: str | None = None
        self.corpus: data_mod.CorpusData | None = None
        self.checkpoint_info: dict[str, Any] = {}
        self.resume_step = 0
        # Made by open():
        self.output_dir: Path | None = None
        self.tracked: tracking.TrackedRun | tracking.RankRun | None = None
        # Made by build() and train():
        self.model: torch.nn.Module | None = None
        self.rows: RowAccess | None = None
        self.initial_new: Path | None = None  # initial_rows.safetensors (rank 0): what the rows moved from
        self.eval_ppl = False
        self.trainer: Any = None
        self.finished = False  # final rows and logged model written: nothing after them can lose the run

    def prepare(self, resume_from: str | None) -> None:
        """Everything that can be wrong with the inputs is found here, before any directory or MLflow run is touched."""
        config = self.config
        # Several processes (torchrun / accelerate launch, WORLD_SIZE > 1): rank 0 does the pre-flight work first
        # (demo conversion, token caches, the output directory) while the others wait here, then they reuse what it
        # made.
        self.rank = ranks.join()
        if self.rank != 0:
            ranks.agree()  # wait for rank 0's pre-flight (and fail with its error)
        self.lexicon_path, self.corpus_path, self.heldout_path = resolve_data_paths(config)

        self.prepared = prepared = build.prepare(config, self.cwd)
        self.starts_from_other_run = resume_from is None and bool(config.train.resume_from)
        if self.starts_from_other_run:
            from .state import resolve_checkpoint

            resume_from = str(resolve_checkpoint(config.train.resume_from))
            log(f"continuing from {resume_from}")
        self.resume_from = resume_from
        self.corpus = data_mod.build_datasets(
            config.data,
            self.corpus_path,
            self.heldout_path,
            prepared.tokenizer,
            token_cache_dir(config.data),
            data_mod.text_form(config),
        )
        # The plugins' own checks against the loaded inputs (a layer the model lacks, words the corpus never uses).
        build.check_inputs(config, prepared, training_span(self.corpus, config.data))
        self.checkpoint_info = checkpoint_info = {
            "base_model": config.model.name_or_path,
            "num_base": prepared.num_base,
            "vocab_size": len(prepared.tokenizer),
            "hidden_size": prepared.hidden_size,
            "strategy": config.train.trainable,
        }
        self.resume_step = 0
        if resume_from is not None:
            manifest = checkpoints.verify(Path(resume_from))
            checkpoints.check_compatible(manifest, Path(resume_from), **checkpoint_info)
            self.resume_step = int(manifest.get("step") or 0)
        # train.resume_schedule=fresh: a new schedule over this run's own steps, kept in the manifest for `wakelab
        # resume`.
        if self.starts_from_other_run:
            checkpoint_info["schedule_start"] = self.resume_step if config.train.resume_schedule == "fresh" else 0
        elif resume_from is not None:
            checkpoint_info["schedule_start"] = int(manifest.get("schedule_start") or 0)

    def open(self, overwrite: bool, run_id: str | None) -> None:
        """The output directory (rank 0 makes it), then, once every rank's pre-flight passed, the MLflow run."""
        config = self.config
        if self.rank == 0:
            self.output_dir = prepare_output_dir(config, overwrite, resume=self.resume_from is not None)
            tracking.check_reachable()
            ranks.agree()  # pre-flight done: the other ranks go on (a no-op for a single process)
        else:
            self.output_dir = config.resolved_output_dir  # made by rank 0, which alone writes the run's own files

        previous_run = _read_run_file(self.output_dir) if self.resume_from else None
        tags = tracking.run_tags(config.preset, self.cwd)
        run_name = config.tracking.run_name or f"{config.preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
        ranks.agree(last=True)  # every rank's pre-flight passed: only now does rank 0 open the MLflow run
        if self.rank == 0:
            self.tracked = tracked = tracking.TrackedRun(
                config.tracking.experiment,
                run_name,
                tags,
                run_id=(previous_run or {}).get("run_id") or run_id,
                system_metrics=config.tracking.system_metrics,
            )
            _from_rank_zero((tracked.run_id, tracked.experiment_id))
        else:
            self.tracked = tracking.RankRun(*_from_rank_zero(None))  # one MLflow run: only rank 0 logs

    def build(self) -> None:
        """Inside the MLflow run: the config and versions logged, the model built, its trainable rows set up."""
        config, prepared, tracked, corpus, output_dir = (
            self.config,
            self.prepared,
            self.tracked,
            self.corpus,
            self.output_dir,
        )
        if self.rank == 0:  # inside run()'s try: whatever fails from here on closes the MLflow run FAILED
            _write_run_file(output_dir, tracked, config)
            tracked.set_tags({"wakelab.output_dir": str(output_dir.resolve())})
        tracked.log_params(config.flat())
        tracked.log_params({f"version.{k}": v for k, v in tracking.library_versions().items()})
        tracked.log_params({"plugins.active": ",".join(name for name, _ in prepared.pm.list_name_plugin())})
        if self.rank == 0:
            (output_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
            tracked.log_artifact(output_dir / "config.yaml")

        self.model = build.build_model(
            config,
            prepared,
            log_params=tracked.log_params,
            set_tags=tracked.set_tags,
            corpus_ids=lambda: training_span(corpus, config.data),
            log_metrics=tracked.log_metrics,
            progress=self.progress and self.rank == 0,
        )
        # Which base the rows belong to, so an export can refuse a base that changed since (see merge.check_base).
        self.checkpoint_info.update(revision=config.model.revision, base_checksum=prepared.base_checksum)
        if prepared.new_words and self.rank == 0:  # the rows as init left them: analysis reads them, never reruns it
            build.save_initial_rows(self.model, prepared.num_base, output_dir / build.INITIAL_ROWS)

        self.rows = rows = setup_trainable_rows(
            self.model, prepared.num_base, config.train.trainable, config.train.rows_dtype, prepared.base_rows
        )
        prepared.base_rows = None  # the split holds what it needs; the loaded matrix must not outlive it
        tracked.log_params({"rows.dtype": str(rows.dtype).removeprefix("torch."), "rows.strategy": rows.strategy})
        self.initial_new = output_dir / build.INITIAL_ROWS if prepared.new_words and self.rank == 0 else None

        log(
            f"corpus: {len(corpus.train_ids):,} tokens -> {len(corpus.train)} training blocks of {config.data.seq_len}"
            + (f", {len(corpus.heldout)} held-out" if corpus.heldout is not None else "")
        )
        report = prepared.report
        if report is not None and self.rank == 0:
            report.corpus = corpus_stats(corpus.train_ids, prepared.num_base, prepared.tokenizer)
            report.write(output_dir / "vocab_report.json")
            tracked.log_artifact(output_dir / "vocab_report.json")
            tracked.log_metrics({"corpus_new_token_share": report.corpus["new_token_share"]}, 0)
        if self.rank == 0 and config.tracking.log_datasets:
            from ..tracking.datasets import try_log_run_datasets

            try_log_run_datasets(
                tracked.run_id,
                warn,
                corpus=self.corpus_path,
                heldout=self.heldout_path,
                lexicon=self.lexicon_path,
                corpus_tokens=len(corpus.train_ids),
                lexicon_added=len(prepared.new_words),
            )

        # Held-out perplexity: rank 0 alone (the ranks hold the same model; the others would repeat the work).
        self.eval_ppl = config.train.eval_perplexity and corpus.heldout is not None and self.rank == 0
        if self.eval_ppl and self.resume_from is None:  # a resumed run logged it in its first part; "after" either way
            before = self._heldout_perplexity(self.model)
            self.result_metrics["heldout_perplexity_before"] = before
            tracked.log_metrics({"heldout_perplexity_before": before}, 0)
            log(f"held-out perplexity before training: {before:.2f}")
            distance = self._heldout_alias_distance()
            if distance is not None:
                self.result_metrics["heldout_alias_mse_before"] = distance
                tracked.log_metrics({"heldout_alias_mse_before": distance}, 0)
                log(
                    f"held-out hidden-state distance, new tokens vs spelled out (last layer, mean squared): "
                    f"{distance:.4g}"
                )

    def train(self) -> None:
        """Trainer built with the hooks bridged to it and run (or, with nothing left to train, put at the end)."""
        config, tracked, resume_from = self.config, self.tracked, self.resume_from
        if self.rank == 0:  # a resumed run's earlier finish mark no longer describes final/ until finish() writes it
            (self.output_dir / "final" / merge.FINISHED_FILE).unlink(missing_ok=True)
        sharded = sharding.wanted(config)  # train.distributed=fsdp under torchrun: resize and init are done, shard now
        if sharded:
            log(sharding.describe_batch(config))
            self.rows = sharding.shard(self.model, self.rows)
            # A sharded forward is a collective: every process measures the held-out perplexity after, rank 0 logs it.
            self.eval_ppl = config.train.eval_perplexity and self.corpus.heldout is not None
        self.run_ctx = run_ctx = RunContext(
            config=config,
            output_dir=self.output_dir,
            run_id=tracked.run_id,
            model=self.model,
            tokenizer=self.prepared.tokenizer,
            rows=self.rows,
            log_artifact=tracked.log_artifact,
            log_params=tracked.log_params,
            log_metrics=tracked.log_metrics,
            set_tags=tracked.set_tags,
            corpus_ids=self.corpus.train_ids,
            is_main_process=self.rank == 0,
        )
        self.checkpoint_info.update(run_id=tracked.run_id, wakelab_version=tracking.library_versions().get("wakelab"))
        self.trainer = trainer = _build_trainer(self, tracked, run_ctx, sharded=sharded)
        if sharded:
            sharding.hand_to_trainer(trainer)
        if resume_from is not None and self.resume_step >= config.train.max_steps:
            # Nothing left to train (a crash after the last checkpoint): finish the run from that checkpoint's rows.
            # Trainer would otherwise take one step past max_steps.
            log(
                f"{resume_from} is at step {self.resume_step} >= train.max_steps={config.train.max_steps}: nothing "
                "left to train; finishing the run from it"
            )
            trainer.load_checkpoint(resume_from)
            trainer.state.global_step = self.resume_step
        else:
            trainer.train(resume_from_checkpoint=resume_from)
        stopping.current().raise_if_requested()  # a stop signal: the checkpoint is written, the run ends KILLED
        self.model = trainer.model

    def finish(self) -> None:
        """The trained rows and tokenizer under ``final/``, held-out perplexity after, metrics, the logged model."""
        config, tracked, rows, model = self.config, self.tracked, self.rows, self.model
        final = self.output_dir / "final"
        with self._write_point("final", final):  # a full disk: one line, each file in final/ whole or absent
            if self.rank == 0:
                final.mkdir(exist_ok=True)
            if (self.prepared.new_words or rows.strategy == "full") and self.rank == 0:
                _save_final_rows(rows, final, tracked.run_id, merge.head_rows(model, rows.new_ids))
                tracked.log_artifact(final / "new_rows.safetensors", "final")
                tracked.log_artifact(merge.write_base_info(final, self.checkpoint_info), "final")
            if config.tracking.log_tokenizer and self.rank == 0:
                with published_dir(final / "tokenizer") as tmp:
                    self.prepared.tokenizer.save_pretrained(tmp)
                tracked.log_artifact(final / "tokenizer", "final/tokenizer")
        if self.eval_ppl:
            after = self._heldout_perplexity(model)
            self.result_metrics["heldout_perplexity_after"] = after
            tracked.log_metrics({"heldout_perplexity_after": after}, self.trainer.state.global_step)
            log(f"held-out perplexity after training: {after:.2f}")
        self.result_metrics.update(new_row_metrics(rows, self.initial_new))
        self.result_metrics["train_seconds"] = time.monotonic() - self.started
        tracked.log_metrics({"train_seconds": self.result_metrics["train_seconds"]}, self.trainer.state.global_step)
        if self.rank == 0 and (final / "new_rows.safetensors").exists():
            with self._write_point("logged-model", final, "the logged model"):
                logged_model.log_run_model(config, tracked, final, self.checkpoint_info, self.prepared.tokenizer, log)
            # Last: the rows and the logged model are complete before any plugin's end-of-run work (close) starts.
            with self._write_point("final", final):
                merge.write_finished(final, tracked.run_id, self.trainer.state.global_step)
            self.finished = True

    def _write_point(self, name: str, path: Path, what: str | None = None):
        """A write at the end of the run: a full disk names what is intact and how to finish the run."""
        out = self.output_dir
        return write_point(
            name,
            path,
            what=what,
            intact=lambda: checkpoints.intact_at_end(out),
            then=lambda: checkpoints.to_continue(out),
        )

    def close(self) -> None:
        """Every exit: plugins' ``on_run_end``, then the MLflow run closed with the status ``self.error`` implies."""
        tracked, error = self.tracked, self.error
        status = tracking.status_for(error)
        stopping.current().closing(tracked.set_tags, status)  # a signal now must not leave the run RUNNING
        end_error: BaseException | None = None
        if self.run_ctx is not None:
            end_error = _plugins_run_end(self.prepared.pm, self.run_ctx, status, final_written=self.finished)
            if end_error is not None and error is None:
                status = "FAILED"
            else:
                end_error = None
        failure = error or end_error
        tracked.end(status, failure if not isinstance(failure, (WakelabError, KeyboardInterrupt)) else None)
        if isinstance(failure, WakelabError) and self.rank == 0:
            _note_failure(tracked, failure)
        if tracked.has_unlogged:
            # The tracking server went away: training went on; say what it did not get and keep that on disk.
            try:
                saved = tracked.save_unlogged(self.output_dir / tracking.UNLOGGED_FILE)
            except OSError as exc:  # a full disk: the message still says what was not logged
                warn(f"could not save what was not logged to {self.output_dir} ({exc})")
                saved = None
            message = tracked.unlogged_message(self.output_dir, saved)
            if failure is None:
                self.incomplete = tracking.TrackingIncomplete(message)
            else:
                warn(message)
        if end_error is not None:
            raise end_error

    def result(self) -> RunResult:
        """The finished run; a tracking store that went away mid-run raises it (exit status 3) instead."""
        tracked = self.tracked
        result = RunResult(
            tracked.run_id,
            tracked.experiment_id,
            self.output_dir,
            "FINISHED",
            self.result_metrics,
            tracking.tracking_uri(),
        )
        if self.incomplete is not None:
            self.incomplete.result = result
            raise self.incomplete  # exit status 3: finished locally, tracking incomplete
        return result

    def _heldout_alias_distance(self) -> float | None:
        """How differently the model reads the held-out text with its new tokens than with them spelled out."""
        prepared, t = self.prepared, self.config.train
        if not prepared.new_words:
            return None
        new_ids = range(prepared.num_base, len(prepared.tokenizer))
        spelled = word_pieces(prepared.tokenizer, prepared.num_base, list(new_ids), prepared.new_words)
        pieces = {i: p for i, p in zip(new_ids, spelled, strict=True) if p}
        return heldout_alias_distance(self.model, self.corpus.heldout.blocks, pieces, t.batch_size, t.eval_max_blocks)

    def _heldout_perplexity(self, model) -> float:
        t = self.config.train
        return perplexity(model, self.corpus.heldout, t.batch_size, t.eval_max_blocks, t.loss_chunk_tokens)


def _plugins_run_end(pm, run_ctx: RunContext, status: str, *, final_written: bool) -> WakelabError | None:
    """Every plugin's ``on_run_end``, one at a time (pluggy's order), so one that fails names itself and the others
    still flush their files; the first failure (``MemoryError`` too) comes back as the error that fails the run."""
    first: WakelabError | None = None
    for impl in reversed(pm.hook.on_run_end.get_hookimpls()):
        arguments = {"run": run_ctx, "status": status}
        try:
            impl.function(**{name: arguments[name] for name in impl.argnames})
        except WriteFailed as exc:  # a full disk: its own line already names the file, what is intact, what next
            first = first or exc
        except Exception as exc:  # noqa: BLE001 - MemoryError is an Exception: a plugin's end work must not lose the run
            kept = (
                "; the final rows and the logged model were written before it (wakelab export works on this run)"
                if final_written
                else ""
            )
            message = f"plugin '{impl.plugin_name}' failed in on_run_end: {type(exc).__name__}: {exc}{kept}"
            warn(message)
            if first is None:
                first = PluginError(message)
                first.__cause__ = exc
    return first


def _note_failure(tracked: tracking.TrackedRun, error: WakelabError) -> None:
    if tracked.offline:
        return
    try:
        with tracking.quiet_retries():  # one try: the run is already closed, this note must not wait on a dead server
            tracking.mlflow_client().set_tag(tracked.run_id, "wakelab.error", tracking.tag_value(str(error)))
    except Exception:  # noqa: BLE001
        pass


def _build_trainer(run: _Run, tracked, run_ctx: RunContext, *, sharded: bool = False):
    """The run's Trainer: its arguments, the hook bridge that feeds the plugins and MLflow, the stop callback."""
    from .trainer import HookBridge, WakelabTrainer

    config, t = run.config, run.config.train
    slot = _TrainerSlot()
    bridge = HookBridge(
        trainer_ref=slot,
        on_start=functools.partial(_start_plugins, slot, run_ctx, run.prepared.pm),
        log_metrics=tracked.log_metrics,
        extra_metrics=functools.partial(new_row_metrics, run.rows, run.initial_new),
        output_dir=run.output_dir,
        run_id=tracked.run_id,
        progress=_progress_bar(t.max_steps) if run.progress and run.rank == 0 else None,
    )
    slot.trainer = WakelabTrainer(
        model=run.model,
        args=_training_arguments(t, run.output_dir, sharded),
        train_dataset=run.corpus.train,
        data_collator=data_mod.collate,
        processing_class=run.prepared.tokenizer,
        callbacks=[bridge, stopping.StopCallback(stopping.current(), run.output_dir)],
        rows=run.rows,
        pm=run.prepared.pm,
        checkpoint_info=run.checkpoint_info,
        config_yaml=yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
        precision=t.precision,
        schedule_start=run.checkpoint_info.get("schedule_start", 0),
        fresh_schedule=run.starts_from_other_run and t.resume_schedule == "fresh",
        loss_chunk_tokens=t.loss_chunk_tokens,
        loss_min_logits=SMALL_LOGITS,
    )
    # Our progress bar and MLflow carry the logs; Trainer's printer would repeat them as raw dicts.
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    slot.trainer.remove_callback(PrinterCallback)
    slot.trainer.remove_callback(ProgressCallback)
    return slot.trainer


class _TrainerSlot:
    """The Trainer, once built. The hook bridge is made first (Trainer takes its callbacks when it is made) and asks
    the slot for the Trainer only once training starts."""

    trainer = None

    def __call__(self):
        return self.trainer


def _start_plugins(slot: _TrainerSlot, run_ctx: RunContext, pm, optimizer) -> None:
    """Training begins: the plugins' ``on_run_start`` sees the optimizer and the step the run starts from."""
    run_ctx.optimizer = optimizer
    run_ctx.start_step = slot.trainer.state.global_step
    pm.hook.on_run_start(run=run_ctx)


def _training_arguments(t, output_dir: Path, sharded: bool):
    """Trainer's arguments from ``train.*``: wakelab logs, saves and shows progress itself."""
    from transformers import TrainingArguments

    if sharded:
        TrainingArguments = sharding.training_arguments()  # noqa: N806 - the same class, but for device placement
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        optim=t.optimizer,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.effective_warmup,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=False,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.bf16_autocast,
        use_cpu=training_device() == "cpu",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        eval_strategy="no",
        ddp_find_unused_parameters=False,  # every trainable tensor takes part in each forward
    )


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="training", unit="step", dynamic_ncols=True, file=sys.stderr)


def training_device() -> str:
    """CUDA when there is one, else the CPU; on Apple silicon (MPS) the CPU too, and one line saying so.

    The CPU is the path every part of wakelab is tested on. On MPS, bitsandbytes' 4-bit layers, torch's fused AdamW
    behind ``train.precision=fp32-master`` and bf16 autocast are not all there, depending on the macOS and torch
    versions, and a run that stops halfway for one of them would be worse than a slower one that finishes.
    """
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        log("Apple MPS is here, but wakelab trains on CUDA or the CPU: this run uses the CPU (docs/install.md)")
    return "cpu"


def _save_final_rows(rows: RowAccess, folder: Path, run_id: str, head_rows: torch.Tensor | None = None) -> None:
    from safetensors.torch import save_file

    ids = rows.trained_ids if rows.strategy == "full" else rows.new_ids
    head = {"head_rows": head_rows} if head_rows is not None and rows.strategy != "full" else {}
    with published_file(folder / "new_rows.safetensors") as tmp:
        save_file(
            {"token_ids": ids, "rows": rows.values(ids).contiguous().cpu(), **head},
            str(tmp),
            metadata={"run_id": run_id, "strategy": rows.strategy, "num_base": str(rows.num_base)},
        )


def _write_run_file(output_dir: Path, tracked: tracking.TrackedRun, config: RunConfig) -> None:
    info = {
        "run_id": tracked.run_id,
        "experiment_id": tracked.experiment_id,
        "tracking_uri": tracking.tracking_uri(),
        "preset": config.preset,
        "pid": os.getpid(),
    }
    (output_dir / RUN_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _read_run_file(output_dir: Path) -> dict[str, Any] | None:
    path = output_dir / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


# -- several processes: torchrun / accelerate launch ----------------------------------------------------------------
# Trainer runs DDP by itself; wakelab only makes its own file and MLflow work happen once, on rank 0. These helpers
# are no-ops in a single process.


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (every rank must call this); the value itself in a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
