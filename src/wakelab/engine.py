"""A run, top to bottom: config -> model -> new tokens -> init -> trainable rows -> data -> Trainer, in MLflow.

Read ``run`` from top to bottom; each step is one call into the module that owns it. The engine knows no plugin by
name: it calls the hooks and lets the active plugins answer.
"""

from __future__ import annotations

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

from . import build, checkpoints, logged_model, merge, ranks, stopping, tracking
from . import data as data_mod
from .build import expand_for_config, load_phase_matrix  # noqa: F401 - their home is build; kept importable here
from .config import RunConfig
from .context import RunContext
from .data import resolve_data_paths, token_cache_dir
from .errors import ConfigError, WakelabError
from .evaluation import perplexity
from .logs import log, warn
from .rows import RowAccess, setup_trainable_rows
from .vocab import corpus_stats

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
        for name in (RUN_FILE, "final", "vocab_report.json", "config.yaml"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def new_row_metrics(rows: RowAccess, initial: torch.Tensor | None) -> dict[str, float]:
    """Mean new-row norm and mean displacement from the rows' initial values."""
    if rows.num_total == rows.num_base:
        return {}
    current = rows.values(rows.new_ids).float()
    metrics = {"new_row_norm": float(current.norm(dim=1).mean())}
    if initial is not None:
        metrics["new_row_displacement"] = float((current - initial.float()).norm(dim=1).mean())
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
    started = time.monotonic()
    # Several processes (torchrun / accelerate launch, WORLD_SIZE > 1): rank 0 does the pre-flight work first (demo
    # conversion, token caches, the output directory) while the others wait here, then they reuse what it made.
    rank = _join_process_group()
    if rank != 0:
        ranks.agree()  # wait for rank 0's pre-flight (and fail with its error)
    lexicon_path, corpus_path, heldout_path = resolve_data_paths(config)

    # Everything that can be wrong with the inputs is found here, before any directory or MLflow run is touched.
    prepared = build.prepare(config, cwd)
    pm, tokenizer, num_base, report, new_words = (
        prepared.pm,
        prepared.tokenizer,
        prepared.num_base,
        prepared.report,
        prepared.new_words,
    )
    starts_from_other_run = resume_from is None and bool(config.train.resume_from)
    if starts_from_other_run:
        from .state import resolve_checkpoint

        resume_from = str(resolve_checkpoint(config.train.resume_from))
        log(f"continuing from {resume_from}")
    corpus = data_mod.build_datasets(config.data, corpus_path, heldout_path, tokenizer, token_cache_dir(config.data))
    checkpoint_info = {
        "base_model": config.model.name_or_path,
        "num_base": num_base,
        "vocab_size": len(tokenizer),
        "hidden_size": prepared.hidden_size,
        "strategy": config.train.trainable,
    }
    resume_step = 0
    if resume_from is not None:
        manifest = checkpoints.verify(Path(resume_from))
        checkpoints.check_compatible(manifest, Path(resume_from), **checkpoint_info)
        resume_step = int(manifest.get("step") or 0)
    # train.resume_schedule=fresh: a new schedule over this run's own steps, kept in the manifest for `wakelab resume`.
    if starts_from_other_run:
        checkpoint_info["schedule_start"] = resume_step if config.train.resume_schedule == "fresh" else 0
    elif resume_from is not None:
        checkpoint_info["schedule_start"] = int(manifest.get("schedule_start") or 0)
    if rank == 0:
        output_dir = prepare_output_dir(config, overwrite, resume=resume_from is not None)
        tracking.check_reachable()
        ranks.agree()  # pre-flight done: the other ranks go on (a no-op for a single process)
    else:
        output_dir = config.resolved_output_dir  # made by rank 0, which alone writes the run's own files

    previous_run = _read_run_file(output_dir) if resume_from else None
    tags = tracking.run_tags(config.preset, cwd)
    run_name = config.tracking.run_name or f"{config.preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    ranks.agree(last=True)  # every rank's pre-flight passed: only now does rank 0 open the MLflow run
    if rank == 0:
        tracked = tracking.TrackedRun(
            config.tracking.experiment,
            run_name,
            tags,
            run_id=(previous_run or {}).get("run_id") or run_id,
            system_metrics=config.tracking.system_metrics,
        )
        _write_run_file(output_dir, tracked, config)
        tracked.set_tags({"wakelab.output_dir": str(output_dir.resolve())})
        _from_rank_zero((tracked.run_id, tracked.experiment_id))
    else:
        tracked = tracking.RankRun(*_from_rank_zero(None))  # one MLflow run: only rank 0 logs
    error: BaseException | None = None
    incomplete: tracking.TrackingIncomplete | None = None
    run_ctx: RunContext | None = None
    result_metrics: dict[str, float] = {}
    try:
        tracked.log_params(config.flat())
        tracked.log_params({f"version.{k}": v for k, v in tracking.library_versions().items()})
        tracked.log_params({"plugins.active": ",".join(name for name, _ in pm.list_name_plugin())})
        if rank == 0:
            (output_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
            tracked.log_artifact(output_dir / "config.yaml")

        model = build.build_model(config, prepared, log_params=tracked.log_params, set_tags=tracked.set_tags)
        # Which base the rows belong to, so an export can refuse a base that changed since (see merge.check_base).
        checkpoint_info.update(revision=config.model.revision, base_checksum=prepared.base_checksum)

        rows = setup_trainable_rows(model, num_base, config.train.trainable, config.train.rows_dtype)
        tracked.log_params({"rows.dtype": str(rows.dtype).removeprefix("torch."), "rows.strategy": rows.strategy})
        initial_new = rows.values(rows.new_ids).clone() if new_words else None

        log(
            f"corpus: {len(corpus.train_ids):,} tokens -> {len(corpus.train)} training blocks of {config.data.seq_len}"
            + (f", {len(corpus.heldout)} held-out" if corpus.heldout is not None else "")
        )
        if report is not None and rank == 0:
            report.corpus = corpus_stats(corpus.train_ids, num_base, tokenizer)
            report.write(output_dir / "vocab_report.json")
            tracked.log_artifact(output_dir / "vocab_report.json")
            tracked.log_metrics({"corpus_new_token_share": report.corpus["new_token_share"]}, 0)
        if rank == 0 and config.tracking.log_datasets:
            from .datasets import try_log_run_datasets

            try_log_run_datasets(
                tracked.run_id,
                log,
                corpus=corpus_path,
                heldout=heldout_path,
                lexicon=lexicon_path,
                corpus_tokens=len(corpus.train_ids),
                lexicon_added=len(new_words),
            )

        # Held-out perplexity: rank 0 alone (the ranks hold the same model; the others would repeat the work).
        eval_ppl = config.train.eval_perplexity and corpus.heldout is not None and rank == 0
        if eval_ppl and resume_from is None:  # a resumed run logged it in its first part; "after" comes either way
            before = perplexity(
                model,
                corpus.heldout,
                config.train.batch_size,
                config.train.eval_max_blocks,
                config.train.loss_chunk_tokens,
            )
            result_metrics["heldout_perplexity_before"] = before
            tracked.log_metrics({"heldout_perplexity_before": before}, 0)
            log(f"held-out perplexity before training: {before:.2f}")

        run_ctx = RunContext(
            config=config,
            output_dir=output_dir,
            run_id=tracked.run_id,
            model=model,
            tokenizer=tokenizer,
            rows=rows,
            log_artifact=tracked.log_artifact,
            log_params=tracked.log_params,
            log_metrics=tracked.log_metrics,
            set_tags=tracked.set_tags,
            corpus_ids=corpus.train_ids,
            is_main_process=rank == 0,
        )
        checkpoint_info.update(run_id=tracked.run_id, wakelab_version=tracking.library_versions().get("wakelab"))
        trainer = _build_trainer(
            config,
            model,
            tokenizer,
            rows,
            pm,
            corpus,
            output_dir,
            tracked,
            run_ctx,
            initial_new,
            progress and rank == 0,
            checkpoint_info,
            fresh_schedule=starts_from_other_run and config.train.resume_schedule == "fresh",
        )
        if resume_from is not None and resume_step >= config.train.max_steps:
            # Nothing left to train (a crash after the last checkpoint): finish the run from that checkpoint's rows.
            # Trainer would otherwise take one step past max_steps.
            log(
                f"{resume_from} is at step {resume_step} >= train.max_steps={config.train.max_steps}: nothing left "
                "to train; finishing the run from it"
            )
            trainer._load_from_checkpoint(resume_from)
            trainer.state.global_step = resume_step
        else:
            trainer.train(resume_from_checkpoint=resume_from)
        stopping.current().raise_if_requested()  # a stop signal: the checkpoint is written, the run ends KILLED
        model = trainer.model

        final = output_dir / "final"
        if rank == 0:
            final.mkdir(exist_ok=True)
        if (new_words or rows.strategy == "full") and rank == 0:
            _save_final_rows(rows, final, tracked.run_id, merge.head_rows(model, rows.new_ids))
            tracked.log_artifact(final / "new_rows.safetensors", "final")
            tracked.log_artifact(merge.write_base_info(final, checkpoint_info), "final")
        if config.tracking.log_tokenizer and rank == 0:
            tokenizer.save_pretrained(final / "tokenizer")
            tracked.log_artifact(final / "tokenizer", "final/tokenizer")
        if eval_ppl:
            after = perplexity(
                model,
                corpus.heldout,
                config.train.batch_size,
                config.train.eval_max_blocks,
                config.train.loss_chunk_tokens,
            )
            result_metrics["heldout_perplexity_after"] = after
            tracked.log_metrics({"heldout_perplexity_after": after}, trainer.state.global_step)
            log(f"held-out perplexity after training: {after:.2f}")
        result_metrics.update(new_row_metrics(rows, initial_new))
        result_metrics["train_seconds"] = time.monotonic() - started
        tracked.log_metrics({"train_seconds": result_metrics["train_seconds"]}, trainer.state.global_step)
        if rank == 0 and (final / "new_rows.safetensors").exists():
            logged_model.log_run_model(config, tracked, final, checkpoint_info, tokenizer, log)
    except BaseException as exc:  # noqa: BLE001 - every exit must close the MLflow run with the right status
        error = exc
        raise
    finally:
        stopping.current().closing(tracked.set_tags)  # a signal now must not leave the run RUNNING
        status = tracking.status_for(error)
        end_error: BaseException | None = None
        if run_ctx is not None:
            try:
                pm.hook.on_run_end(run=run_ctx, status=status)
            except Exception as hook_error:  # noqa: BLE001 - a failed flush fails the run, after closing it
                warn(f"an on_run_end plugin failed: {hook_error}")
                if error is None:
                    end_error, status = hook_error, "FAILED"
        failure = error or end_error
        tracked.end(status, failure if not isinstance(failure, (WakelabError, KeyboardInterrupt)) else None)
        if isinstance(failure, WakelabError) and rank == 0:
            _note_failure(tracked, failure)
        if tracked.has_unlogged:
            # The tracking server went away: training went on; say what it did not get and keep that on disk.
            saved = tracked.save_unlogged(output_dir / tracking.UNLOGGED_FILE)
            message = tracked.unlogged_message(output_dir, saved)
            if failure is None:
                incomplete = tracking.TrackingIncomplete(message)
            else:
                warn(message)
        if end_error is not None:
            raise end_error
    result = RunResult(
        tracked.run_id, tracked.experiment_id, output_dir, "FINISHED", result_metrics, tracking.tracking_uri()
    )
    if incomplete is not None:
        incomplete.result = result
        raise incomplete  # exit status 3: finished locally, tracking incomplete
    return result


def _note_failure(tracked: tracking.TrackedRun, error: WakelabError) -> None:
    from mlflow import MlflowClient

    if tracked.offline:
        return
    try:
        with tracking._quiet_retries():  # one try: the run is already closed, this note must not wait on a dead server
            MlflowClient().set_tag(tracked.run_id, "wakelab.error", str(error)[:5000])
    except Exception:  # noqa: BLE001
        pass


def _build_trainer(
    config,
    model,
    tokenizer,
    rows,
    pm,
    corpus,
    output_dir,
    tracked,
    run_ctx,
    initial_new,
    progress,
    checkpoint_info,
    fresh_schedule=False,
):
    from transformers import TrainingArguments

    from .trainer import HookBridge, WakelabTrainer

    t = config.train
    use_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
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
        optim="adamw_torch",
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
        use_cpu=use_cpu,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        eval_strategy="no",
        ddp_find_unused_parameters=False,  # every trainable tensor takes part in each forward
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.max_steps, desc="training", unit="step", dynamic_ncols=True, file=sys.stderr)

    def on_start(optimizer):
        run_ctx.optimizer = optimizer
        run_ctx.start_step = trainer.state.global_step
        pm.hook.on_run_start(run=run_ctx)

    trainer: WakelabTrainer
    bridge = HookBridge(
        trainer_ref=lambda: trainer,
        on_start=on_start,
        log_metrics=tracked.log_metrics,
        extra_metrics=lambda: new_row_metrics(rows, initial_new),
        output_dir=output_dir,
        run_id=tracked.run_id,
        progress=bar,
    )
    trainer = WakelabTrainer(
        model=model,
        args=args,
        train_dataset=corpus.train,
        data_collator=data_mod.collate,
        processing_class=tokenizer,
        callbacks=[bridge, stopping.StopCallback(stopping.current(), output_dir)],
        rows=rows,
        pm=pm,
        checkpoint_info=checkpoint_info,
        config_yaml=yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
        precision=t.precision,
        schedule_start=checkpoint_info.get("schedule_start", 0),
        fresh_schedule=fresh_schedule,
        loss_chunk_tokens=t.loss_chunk_tokens,
    )
    # Our progress bar and MLflow carry the logs; Trainer's printer would repeat them as raw dicts.
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _save_final_rows(rows: RowAccess, folder: Path, run_id: str, head_rows: torch.Tensor | None = None) -> None:
    from safetensors.torch import save_file

    ids = rows.trained_ids if rows.strategy == "full" else rows.new_ids
    head = {"head_rows": head_rows} if head_rows is not None and rows.strategy != "full" else {}
    save_file(
        {"token_ids": ids, "rows": rows.values(ids).contiguous().cpu(), **head},
        str(folder / "new_rows.safetensors"),
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


def _join_process_group() -> int:
    """This process's global rank. Under a launcher (WORLD_SIZE > 1) join the process group now, so the pre-flight
    work can wait on a barrier; Trainer (through accelerate) then reuses the group. gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("cuda:nccl,cpu:gloo")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank()


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (every rank must call this); the value itself in a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
