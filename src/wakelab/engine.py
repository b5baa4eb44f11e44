"""A run, top to bottom: config -> model -> new tokens -> init -> trainable rows -> data -> Trainer, in MLflow.

Read ``run`` from top to bottom; each step is one call into the module that owns it. The engine knows no plugin by
name: it calls the hooks and lets the active plugins answer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from . import data as data_mod
from . import model as model_mod
from . import checkpoints, registry, tracking
from .config import RunConfig
from .context import InitContext, RunContext
from .errors import ConfigError, PluginError, WakelabError
from .rows import RowAccess, setup_trainable_rows
from .vocab import corpus_stats, expand_vocabulary, read_lexicon

RUN_FILE = "wakelab_run.json"


@dataclass
class RunResult:
    run_id: str
    experiment_id: str
    output_dir: Path
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    tracking_uri: str = ""


def log(message: str) -> None:
    if os.environ.get("RANK", "0") != "0":
        return  # several processes (torchrun): rank 0 speaks for all of them
    print(f"wakelab: {message}", file=sys.stderr, flush=True)


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


def resolve_lexicon(config: RunConfig) -> str | None:
    """The lexicon path; `demo` names the embedded demo lexicon."""
    if config.vocab.lexicon == "demo":
        from .demo import ensure_demo_texts

        return str(ensure_demo_texts().lexicon)
    return config.vocab.lexicon


def resolve_data_paths(config: RunConfig) -> tuple[str | None, str | None, str | None]:
    """Lexicon, corpus and held-out paths; `demo` names the embedded demo texts."""
    corpus, heldout = config.data.corpus, config.data.heldout
    if "demo" in (corpus, heldout):
        from .demo import ensure_demo_texts

        texts = ensure_demo_texts()
        corpus = str(texts.corpus) if corpus == "demo" else corpus
        heldout = str(texts.heldout) if heldout == "demo" else heldout
    if corpus is None:
        raise ConfigError("data.corpus: no corpus given; set data.corpus to a UTF-8 text file (or `demo`)")
    return resolve_lexicon(config), corpus, heldout


def perplexity(model, dataset, batch_size: int, max_blocks: int) -> float:
    """exp(mean token negative log-likelihood) over the first ``max_blocks`` held-out blocks."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    count = min(len(dataset), max_blocks)
    device = next(p for p in model.parameters()).device
    with torch.no_grad():
        for start in range(0, count, batch_size):
            batch = data_mod.collate([dataset[i] for i in range(start, min(count, start + batch_size))])
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            tokens = (batch["shift_labels"] if "shift_labels" in batch else batch["labels"][:, 1:]).numel()
            total_loss += float(out.loss) * tokens
            total_tokens += tokens
    model.train(was_training)
    return math.exp(total_loss / max(total_tokens, 1))


def new_row_metrics(rows: RowAccess, initial: torch.Tensor | None) -> dict[str, float]:
    """Mean new-row norm and mean displacement from the rows' initial values."""
    if rows.num_total == rows.num_base:
        return {}
    current = rows.values(rows.new_ids).float()
    metrics = {"new_row_norm": float(current.norm(dim=1).mean())}
    if initial is not None:
        metrics["new_row_displacement"] = float((current - initial.float()).norm(dim=1).mean())
    return metrics


def load_phase_matrix(path: str, shape: tuple[int, int], tokenizer) -> tuple[torch.Tensor, dict[str, Any]]:
    """An earlier phase's embedding matrix, checked against this run's expanded vocabulary before anything starts."""
    from .phase import load_embedding_matrix

    matrix, token_ids, source_meta = load_embedding_matrix(path)
    if tuple(matrix.shape) != tuple(shape):
        raise ConfigError(
            f"init.from_embeddings {path}: matrix shape {tuple(matrix.shape)} does not fit the expanded vocabulary "
            f"{tuple(shape)}; it comes from another model or lexicon"
        )
    if token_ids is not None:
        vocab = tokenizer.get_vocab()
        for token, index in token_ids.items():
            if vocab.get(token) != index:
                raise ConfigError(
                    f"init.from_embeddings {path}: token '{token}' has id {index} there but "
                    f"{vocab.get(token)} in this tokenizer; it was saved for another lexicon order"
                )
    return matrix, {"restored_from": str(path), **source_meta}


def run(
    config: RunConfig,
    *,
    overwrite: bool = False,
    resume_from: str | None = None,
    progress: bool = True,
    cwd: Path | None = None,
) -> RunResult:
    """Build the run the config describes and train it inside one MLflow run."""
    started = time.monotonic()
    # Several processes (torchrun / accelerate launch, WORLD_SIZE > 1): rank 0 does the pre-flight work first (demo
    # conversion, token caches, the output directory) while the others wait here, then they reuse what it made.
    rank = _join_process_group()
    if rank != 0:
        _barrier()
    pm = registry.build_manager(config.active_plugins, cwd, optional=[config.init.method])
    lexicon_path, corpus_path, heldout_path = resolve_data_paths(config)

    # Everything that can be wrong with the inputs is found here, before any directory or MLflow run is touched.
    source = model_mod.model_source(config.model, config.train.seed)
    model_config = model_mod.load_model_config(source, config.model.revision)
    model_mod.check_seq_len(model_config, config.data.seq_len)
    tokenizer = model_mod.load_tokenizer(model_mod.tokenizer_source(config.model) or source, config.model.revision)
    if resume_from is None and config.train.resume_from:
        from .state import resolve_checkpoint

        resume_from = str(resolve_checkpoint(config.train.resume_from))
        log(f"continuing from {resume_from}")
    num_base = len(tokenizer)
    report, new_words = None, []
    if lexicon_path is not None:
        report, new_words = expand_vocabulary(tokenizer, read_lexicon(lexicon_path), config.vocab.add_as, lexicon_path)
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else model_mod.cache_root() / "tokens"
    corpus = data_mod.build_datasets(config.data, corpus_path, heldout_path, tokenizer, cache_dir)
    checkpoint_info = {
        "base_model": config.model.name_or_path,
        "num_base": num_base,
        "vocab_size": len(tokenizer),
        "hidden_size": getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", None),
        "strategy": config.train.trainable,
    }
    phase = None
    if config.init.from_embeddings:
        phase = load_phase_matrix(config.init.from_embeddings, (len(tokenizer), checkpoint_info["hidden_size"]), tokenizer)
    resume_step = 0
    if resume_from is not None:
        manifest = checkpoints.verify(Path(resume_from))
        checkpoints.check_compatible(manifest, Path(resume_from), **checkpoint_info)
        resume_step = int(manifest.get("step") or 0)
    if rank == 0:
        output_dir = prepare_output_dir(config, overwrite, resume=resume_from is not None)
        tracking.check_reachable()
        _barrier()  # pre-flight done: the other ranks go on (a no-op for a single process)
    else:
        output_dir = config.resolved_output_dir  # made by rank 0, which alone writes the run's own files

    previous_run = _read_run_file(output_dir) if resume_from else None
    tags = {
        "wakelab.preset": config.preset or "",
        "wakelab.version": tracking.library_versions().get("wakelab", ""),
    }
    commit = tracking.git_commit(cwd)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run_name = config.tracking.run_name or f"{config.preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    if rank == 0:
        tracked = tracking.TrackedRun(
            config.tracking.experiment, run_name, tags, run_id=(previous_run or {}).get("run_id"),
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

        what = f"a {config.model.architecture['model_type']} built from model.architecture" if config.model.architecture \
            else f"base model {config.model.name_or_path}"
        log(f"loading {what}" + (" in 4-bit nf4" if config.model.load_in_4bit else ""))
        model = model_mod.load_model(config.model, source)
        embedding_rows = model.get_input_embeddings().weight.shape[0]
        tracked.log_params({"base_vocab_size": num_base, "hidden_size": model.get_input_embeddings().weight.shape[1]})
        if report is not None:
            model_mod.expand_embeddings(model, len(tokenizer))
            log(report.summary())
        elif embedding_rows < len(tokenizer):
            model_mod.expand_embeddings(model, len(tokenizer))
        tracked.log_params({"added_tokens": len(new_words), "vocab_size": len(tokenizer)})

        weight = model.get_input_embeddings().weight
        new_ids = torch.arange(num_base, weight.shape[0])
        if new_words:
            init_summary = _init_new_rows(pm, config, weight, num_base, new_ids, new_words, tokenizer)
            tracked.log_params({f"init.result.{k}": v for k, v in init_summary.items()})
        if phase is not None:
            matrix, restored = phase
            with torch.no_grad():
                weight.copy_(matrix.to(weight.dtype))
            tracked.log_params({"init.restored_from": restored["restored_from"]})
            tracked.set_tags({"wakelab.restored_from": restored["restored_from"]}
                             | ({"wakelab.source_run": restored["run_id"]} if restored.get("run_id") else {}))
            log(f"restored embeddings from {restored['restored_from']}")

        rows = setup_trainable_rows(model, num_base, config.train.trainable, config.train.rows_dtype)
        tracked.log_params({"rows.dtype": str(rows.dtype).removeprefix("torch."), "rows.strategy": rows.strategy})
        initial_new = rows.values(rows.new_ids).clone() if new_words else None

        log(f"corpus: {len(corpus.train_ids):,} tokens -> {len(corpus.train)} training blocks of {config.data.seq_len}"
            + (f", {len(corpus.heldout)} held-out" if corpus.heldout is not None else ""))
        if report is not None and rank == 0:
            report.corpus = corpus_stats(corpus.train_ids, num_base, tokenizer)
            report.write(output_dir / "vocab_report.json")
            tracked.log_artifact(output_dir / "vocab_report.json")
            tracked.log_metrics({"corpus_new_token_share": report.corpus["new_token_share"]}, 0)
        if rank == 0 and config.tracking.log_datasets:
            from .datasets import try_log_run_datasets

            try_log_run_datasets(tracked.run_id, log, corpus=corpus_path, heldout=heldout_path, lexicon=lexicon_path,
                                 corpus_tokens=len(corpus.train_ids), lexicon_added=len(new_words))

        # Held-out perplexity: rank 0 alone (the ranks hold the same model; the others would repeat the work).
        eval_ppl = config.train.eval_perplexity and corpus.heldout is not None and resume_from is None and rank == 0
        if eval_ppl:
            before = perplexity(model, corpus.heldout, config.train.batch_size, config.train.eval_max_blocks)
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
        )
        checkpoint_info.update(run_id=tracked.run_id, wakelab_version=tracking.library_versions().get("wakelab"))
        trainer = _build_trainer(config, model, tokenizer, rows, pm, corpus, output_dir, tracked, run_ctx, initial_new,
                                 progress and rank == 0, checkpoint_info)
        if resume_from is not None and resume_step >= config.train.max_steps:
            # Nothing left to train (a crash after the last checkpoint): finish the run from that checkpoint's rows.
            # Trainer would otherwise take one step past max_steps.
            log(f"{resume_from} is at step {resume_step} >= train.max_steps={config.train.max_steps}: nothing left "
                "to train; finishing the run from it")
            trainer._load_from_checkpoint(resume_from)
            trainer.state.global_step = resume_step
        else:
            trainer.train(resume_from_checkpoint=resume_from)
        model = trainer.model

        final = output_dir / "final"
        if rank == 0:
            final.mkdir(exist_ok=True)
        if (new_words or rows.strategy == "full") and rank == 0:
            _save_final_rows(rows, final, tracked.run_id)
            tracked.log_artifact(final / "new_rows.safetensors", "final")
        if config.tracking.log_tokenizer and rank == 0:
            tokenizer.save_pretrained(final / "tokenizer")
            tracked.log_artifact(final / "tokenizer", "final/tokenizer")
        if eval_ppl:
            after = perplexity(model, corpus.heldout, config.train.batch_size, config.train.eval_max_blocks)
            result_metrics["heldout_perplexity_after"] = after
            tracked.log_metrics({"heldout_perplexity_after": after}, trainer.state.global_step)
            log(f"held-out perplexity after training: {after:.2f}")
        result_metrics.update(new_row_metrics(rows, initial_new))
        result_metrics["train_seconds"] = time.monotonic() - started
        tracked.log_metrics({"train_seconds": result_metrics["train_seconds"]}, trainer.state.global_step)
    except BaseException as exc:  # noqa: BLE001 - every exit must close the MLflow run with the right status
        error = exc
        raise
    finally:
        status = tracking.status_for(error)
        end_error: BaseException | None = None
        if run_ctx is not None:
            try:
                pm.hook.on_run_end(run=run_ctx, status=status)
            except Exception as hook_error:  # noqa: BLE001 - a failed flush fails the run, after closing it
                log(f"an on_run_end plugin failed: {hook_error}")
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
                log(f"warning: {message}")
        if end_error is not None:
            raise end_error
    result = RunResult(tracked.run_id, tracked.experiment_id, output_dir, "FINISHED", result_metrics,
                       tracking.tracking_uri())
    if incomplete is not None:
        incomplete.result = result
        raise incomplete  # exit status 3: finished locally, tracking incomplete
    return result


def expand_for_config(config: RunConfig):
    """The base model with the run's vocabulary expansion and init applied: the state a run starts from."""
    lexicon_path = resolve_lexicon(config)
    source = model_mod.model_source(config.model, config.train.seed)
    tokenizer = model_mod.load_tokenizer(model_mod.tokenizer_source(config.model) or source, config.model.revision)
    num_base = len(tokenizer)
    model = model_mod.load_model(config.model, source)
    if lexicon_path is not None:
        _, new_words = expand_vocabulary(tokenizer, read_lexicon(lexicon_path), config.vocab.add_as, lexicon_path)
        model_mod.expand_embeddings(model, len(tokenizer))
        pm = registry.build_manager(config.active_plugins, optional=[config.init.method])
        weight = model.get_input_embeddings().weight
        _init_new_rows(pm, config, weight, num_base, torch.arange(num_base, weight.shape[0]), new_words, tokenizer)
    if config.init.from_embeddings:
        weight = model.get_input_embeddings().weight
        matrix, _ = load_phase_matrix(config.init.from_embeddings, tuple(weight.shape), tokenizer)
        with torch.no_grad():
            weight.copy_(matrix.to(weight.dtype))
    return model, tokenizer, num_base


def _note_failure(tracked: tracking.TrackedRun, error: WakelabError) -> None:
    from mlflow import MlflowClient

    if tracked.offline:
        return
    try:
        with tracking._quiet_retries():  # one try: the run is already closed, this note must not wait on a dead server
            MlflowClient().set_tag(tracked.run_id, "wakelab.error", str(error)[:5000])
    except Exception:  # noqa: BLE001
        pass


def _init_new_rows(pm, config, weight, num_base, new_ids, new_words, tokenizer) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(config.init.seed)
    ctx = InitContext(
        method=config.init.method,
        weight=weight.data,
        num_base=num_base,
        new_ids=new_ids,
        new_words=new_words,
        tokenizer=tokenizer,
        options=config.init.model_dump(),
        generator=generator,
        log=log,
    )
    with torch.no_grad():
        summary = pm.hook.init_embeddings(ctx=ctx)
    if summary is None:
        known = [row["name"] for row in registry.describe() if "init_embeddings" in row["hooks"]]
        raise PluginError(
            f"no plugin answered init.method={config.init.method}; init plugins found: "
            f"{', '.join(known) or 'none'} (or activate your own with --plugin NAME|PATH)"
        )
    return dict(summary)


def _build_trainer(config, model, tokenizer, rows, pm, corpus, output_dir, tracked, run_ctx, initial_new, progress,
                   checkpoint_info):
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
        callbacks=[bridge],
        rows=rows,
        pm=pm,
        checkpoint_info=checkpoint_info,
        config_yaml=yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
    )
    # Our progress bar and MLflow carry the logs; Trainer's printer would repeat them as raw dicts.
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _save_final_rows(rows: RowAccess, folder: Path, run_id: str) -> None:
    from safetensors.torch import save_file

    ids = rows.trained_ids if rows.strategy == "full" else rows.new_ids
    save_file(
        {"token_ids": ids, "rows": rows.values(ids).contiguous().cpu()},
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


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (every rank must call this); the value itself in a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
