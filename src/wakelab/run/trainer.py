"""transformers.Trainer, plus the few seams wakelab needs, and the callback that bridges its events to the hooks.

The loop, accumulation, mixed precision, schedules, checkpoint/resume and DDP are Trainer's. The subclass adds,
through Trainer's public methods where it has one: base-row masking *before* clipping (``training_step`` masks once
the step's last micro-batch has been backpropagated; Trainer's ``on_pre_optimizer_step`` comes after the clip, so the
clip and the logged grad norm would otherwise see gradients that are then thrown away); the step's loss and
last-position logits for ``on_step_end`` (``training_step``, ``compute_loss``); AdamW decay that spares base rows
under ``mask`` (``get_decay_parameter_names``); a fresh schedule over a loaded optimizer (``create_scheduler`` keeps
it, ``on_train_begin`` puts it back); checkpoints that hold the trained rows (``save_model``); and the chunked loss
(``loss.py``), which never holds the whole batch's vocabulary-sized logits.

Three private names remain, because Trainer has no public seam for them: ``_save_checkpoint`` and ``_get_output_dir``
(a checkpoint is written into a staging folder and published whole by one rename) and ``_load_from_checkpoint`` (a
checkpoint of trained rows holds no model weights for Trainer to find). ``PRIVATE_TRAINER_API`` lists them with the
parameters wakelab relies on; ``tests/test_trainer_api.py`` fails, naming the one that changed, when the installed
transformers no longer has them.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..hooks.context import GradContext, SaveContext, StepState
from ..logs import warn
from ..loss import DEFAULT_CHUNK_TOKENS, ChunkedLoss
from ..rows import RowAccess
from ..storage import crashpoint
from ..storage.writepoint import WriteFailed

ROWS_FILE = "trained_rows.safetensors"

#: The private Trainer methods wakelab still overrides or calls, with the parameters it passes (checked by a test).
PRIVATE_TRAINER_API: dict[str, tuple[str, ...]] = {
    "_save_checkpoint": ("model", "trial"),
    "_get_output_dir": ("trial",),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    # train.distributed=fsdp with train.trainable=full: Adam's state gathered whole into optimizer.pt, and back.
    "_save_optimizer_and_scheduler": ("output_dir",),
    "_load_optimizer_and_scheduler": ("checkpoint",),
}
#: The model attribute transformers' quantization check reads to accept a quantized base that carries an adapter.
PEFT_LOADED_FLAG = "_hf_peft_config_loaded"


class WakelabTrainer(Trainer):
    """Trainer with the hooks' seams; everything else is Trainer's own."""

    def __init__(
        self,
        *args,
        rows: RowAccess,
        pm,
        checkpoint_info: dict[str, Any] | None = None,
        config_yaml: str = "",
        precision: str = "bf16",
        schedule_start: int = 0,
        fresh_schedule: bool = False,
        loss_chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
        loss_min_logits: int = 0,
        **kwargs,
    ):
        self.rows = rows
        self.precision = precision
        self.schedule_start = schedule_start  # the schedule spans steps schedule_start..max_steps (a fresh one)
        self.fresh_schedule = fresh_schedule  # loading a checkpoint keeps this run's new schedule, not the saved one
        # None: transformers' own loss over the full-vocabulary logits; so is a batch whose logits are under
        # loss_min_logits values (the engine passes loss.SMALL_LOGITS).
        self.chunked_loss = (
            ChunkedLoss(loss_chunk_tokens, min_logits=loss_min_logits) if loss_chunk_tokens is not None else None
        )
        self.pm = pm
        self.checkpoint_info = checkpoint_info or {}
        self.config_yaml = config_yaml
        self._staging_root: Path | None = None
        self.step_loss = torch.zeros(())
        self.step_logits: torch.Tensor | None = None
        self.step_lr: float = 0.0
        self._masked_at_step: int | None = None
        model = kwargs.get("model") or args[0]
        with _row_adapter_accepted(model):
            super().__init__(*args, **kwargs)

    # -- per-step observations -----------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            # The step's last micro-batch is backpropagated (and, in DDP, its gradients all-reduced): mask now, before
            # Trainer clips and measures the gradient norm.
            self._mask_once()
        # Trainer returns each micro-batch's share of the step loss: their sum is the step's mean loss.
        self.step_loss = self.step_loss + loss.detach().float().cpu()
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chunked = None
        if (
            self.chunked_loss is not None
            and model.training
            and self.compute_loss_func is None
            and self.label_smoother is None
        ):
            chunked = self.chunked_loss(model, inputs, num_items_in_batch if self.model_accepts_loss_kwargs else None)
        if chunked is not None:
            loss, outputs = chunked
            if (
                self.args.average_tokens_across_devices
                and self.model_accepts_loss_kwargs
                and num_items_in_batch is not None
            ):
                # As Trainer.compute_loss does for a loss normalised by num_items_in_batch.
                scale = self.accelerator.num_processes // self.get_tp_size()
                loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        else:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
        if model.training:
            self.step_logits = logits[0, -1].detach().float().clone()
        return (loss, outputs) if return_outputs else loss

    # -- masking before clipping ---------------------------------------------------------------------------------
    def _mask_once(self) -> None:
        """mask_grads once per optimizer step: after the last micro-batch's backward, or at on_pre_optimizer_step."""
        if self._masked_at_step == self.state.global_step:
            return
        self._masked_at_step = self.state.global_step
        self.pm.hook.mask_grads(
            ctx=GradContext(
                step=self.state.global_step + 1,
                rows=self.rows,
                model=self.model,
                is_main_process=self.is_world_process_zero(),
            )
        )

    # -- optimizer: base rows never decay ------------------------------------------------------------------------
    def get_decay_parameter_names(self, model) -> list[str]:
        names = super().get_decay_parameter_names(model)
        if self.rows.strategy != "mask":
            return names
        # The embedding matrix sits in a no-decay group; decay_new_rows applies AdamW's decay to new rows only.
        held = {id(p) for p in self.rows.parameters()}
        return [n for n, p in model.named_parameters() if n in names and id(p) not in held]

    # -- optimizer and schedule: train.precision, train.resume_schedule --------------------------------------------
    def create_optimizer(self, model=None):
        from ..precision import build_optimizer, check_parameters

        optimizer = super().create_optimizer(model)
        if self.precision != "bf16" and not getattr(self, "_precision_applied", False):
            check_parameters(self.precision, [p for g in optimizer.param_groups for p in g["params"]])
            self.optimizer = build_optimizer(self.precision, optimizer, seed=self.args.seed)
            self._precision_applied = True
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps - self.schedule_start, optimizer)
        self._fresh_schedule = copy.deepcopy(scheduler.state_dict()) if self.fresh_schedule else None
        return scheduler

    def keep_fresh_schedule(self) -> None:
        """train.resume_schedule=fresh: put back the schedule made for this run over the one a checkpoint loaded.

        Trainer loads the checkpoint's optimizer and scheduler before ``on_train_begin``, which calls this: Adam's
        moments (and step count) carry over, the learning rate follows this run's own schedule.
        """
        if getattr(self, "_fresh_schedule", None) is None:
            return
        self.lr_scheduler.load_state_dict(self._fresh_schedule)
        for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr(), strict=False):
            group["lr"] = lr

    # -- checkpoints: complete or absent ---------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        return str(self._staging_root) if self._staging_root is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer writes into a staging folder; the manifest goes in last and one rename publishes it."""
        import shutil

        from ..storage.checkpoints import STAGING, finalize, intact_after_failure, rotate
        from ..storage.writepoint import write_point

        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        # A full disk or an I/O error anywhere in here is one line naming the file (see wakelab.storage.writepoint).
        with write_point(
            "checkpoint",
            run_dir / STAGING / name,
            what=name,
            intact=lambda: intact_after_failure(run_dir),
            then=f"wakelab resume {run_dir}",
        ):
            self._staging_root = run_dir / STAGING
            if self.args.should_save:
                shutil.rmtree(self._staging_root / name, ignore_errors=True)  # a crash's leftovers
            # Several processes (DDP): every rank writes its own rng_state_<rank>.pth into the staging folder, so the
            # leftovers go before any rank writes, and rank 0 publishes only once all have written. Trainer saves on
            # every rank, so every rank reaches these barriers (no-ops in a single process).
            self.accelerator.wait_for_everyone()
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_root = None
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                staged = run_dir / STAGING / name
                (staged / "wakelab_config.yaml").write_text(self.config_yaml, encoding="utf-8")
                finalize(staged, run_dir / name, {"step": self.state.global_step, **self.checkpoint_info})
                rotate(run_dir, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()  # published before any rank goes on

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The trained rows (and the tokenizer), unless the whole model trains: then Trainer's own save."""
        if self.rows.strategy == "full":
            if self._sharded_full():  # train.distributed=fsdp: the shards gathered first
                from .sharding import save_whole_model

                return save_whole_model(self, output_dir)
            return super().save_model(output_dir, _internal_call)
        if not self.args.should_save:
            return  # several processes: the rows are the same on every rank; rank 0 writes them
        from safetensors.torch import save_file

        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        from .merge import head_rows

        head = head_rows(self.model, self.rows.trained_ids)  # an untied head's own new rows
        save_file(
            {**self.rows.trained_rows(), **({"head_rows": head} if head is not None else {})},
            str(out / ROWS_FILE),
            metadata={"strategy": self.rows.strategy},
        )
        crashpoint.reached("rows-written")
        if self.processing_class is not None:
            self.processing_class.save_pretrained(out)

    def _sharded_full(self) -> bool:
        """train.distributed=fsdp with train.trainable=full: sharded trainable weights and Adam state."""
        return self.rows.strategy == "full" and getattr(self, "is_distributed_loading_by_transformers", False)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._sharded_full():
            from .sharding import save_whole_optimizer

            save_whole_optimizer(self, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._sharded_full():
            return super()._load_optimizer_and_scheduler(checkpoint)
        from .sharding import load_whole_optimizer

        load_whole_optimizer(self, checkpoint)

    def load_checkpoint(self, checkpoint: str | Path) -> None:
        """A checkpoint's trained rows (or, under ``full``, its weights) into the model, without training."""
        self._load_from_checkpoint(str(checkpoint))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = Path(resume_from_checkpoint) / ROWS_FILE
        if self._sharded_full():
            from .sharding import load_whole_model

            return load_whole_model(self, resume_from_checkpoint)
        if self.rows.strategy == "full" or not path.exists():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        saved = load_file(str(path))
        self.rows.load_rows(saved["token_ids"], saved["rows"])
        if "head_rows" in saved:  # an untied head's own new rows
            from .merge import load_head_rows

            load_head_rows(self.model, saved["token_ids"].long(), saved["head_rows"])


@contextlib.contextmanager
def _row_adapter_accepted(model):
    """Let Trainer accept a 4-bit base: the trainable rows are wakelab's adapter, though not a PEFT one.

    Trainer refuses to fine-tune a quantized model unless it sees a PEFT adapter; its only test is this flag,
    checked once in ``__init__``. The flag is removed right after, so nothing else takes the model for PEFT.
    """
    quantized = getattr(model, "is_quantized", False) and not getattr(model, PEFT_LOADED_FLAG, False)
    if quantized:
        setattr(model, PEFT_LOADED_FLAG, True)
    try:
        yield
    finally:
        if quantized:
            delattr(model, PEFT_LOADED_FLAG)


class HookBridge(TrainerCallback):
    """Trainer events -> wakelab hooks and MLflow metrics. The only place the two meet."""

    def __init__(
        self,
        trainer_ref: Callable[[], WakelabTrainer],
        on_start: Callable[[Any], None],
        log_metrics: Callable[[dict[str, float], int], None],
        extra_metrics: Callable[[], dict[str, float]],
        output_dir: Path,
        run_id: str | None,
        progress=None,
    ):
        self._trainer = trainer_ref
        self._on_start = on_start
        self._log_metrics = log_metrics
        self._extra_metrics = extra_metrics
        self._output_dir = output_dir
        self._run_id = run_id
        self._progress = progress

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        trainer.keep_fresh_schedule()
        self._on_start(trainer.optimizer)
        if self._progress is not None:
            self._progress.reset(total=state.max_steps)
            self._progress.update(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self._trainer()
        trainer._mask_once()  # no-op when clipping already did it
        lr = trainer.optimizer.param_groups[0]["lr"]
        trainer.step_lr = lr
        trainer.rows.decay_new_rows(lr, args.weight_decay)
        trainer.rows.hold_grads()

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self._trainer()
        step_state = StepState(
            step=state.global_step,
            loss=float(trainer.step_loss),
            lr=trainer.step_lr,
            logits=trainer.step_logits,
            model=trainer.model,
            optimizer=trainer.optimizer,
            rows=trainer.rows,
            is_main_process=state.is_world_process_zero,
        )
        trainer.pm.hook.on_step_end(state=step_state)
        if self._progress is not None:
            self._progress.update(1)
            loss = step_state.loss
            self._progress.set_postfix(loss=f"{loss:.4f}" if math.isfinite(loss) else loss, refresh=False)
        trainer.step_loss = torch.zeros(())
        trainer.rows.release_grads()
        if control.should_training_stop:
            control.should_log = True  # the last step's loss, lr and grad norm, whatever logging_steps is

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or state.global_step == 0:
            return
        metrics = {}
        renames = {"learning_rate": "lr", "loss": "loss", "grad_norm": "grad_norm"}
        for key, value in logs.items():
            if key in renames and isinstance(value, (int, float)):
                metrics[renames[key]] = float(value)
            elif key.startswith(("eval_", "train_")) and isinstance(value, (int, float)):
                metrics[key] = float(value)  # train_*: Trainer's end-of-training summary (mean loss, runtime, speed)
        if "loss" in metrics:
            metrics.update(self._extra_metrics())
        if metrics:
            self._log_metrics(metrics, state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return  # several processes: one checkpoint, so one on_save (one set of mirrors), on rank 0 that wrote it
        trainer = self._trainer()
        checkpoint = self._output_dir / f"checkpoint-{state.global_step}"
        ctx = SaveContext(
            checkpoint_dir=checkpoint,
            step=state.global_step,
            output_dir=self._output_dir,
            run_id=self._run_id,
            is_main_process=state.is_world_process_zero,
        )
        # One plugin at a time (pluggy's order): one that fails is reported and the others, a Sentry mirror, still run.
        # A full disk or an I/O error (wakelab.storage.writepoint) stops the run, once the others have run.
        disk_failure = None
        for impl in reversed(trainer.pm.hook.on_save.get_hookimpls()):
            try:
                impl.function(ctx=ctx)
            except WriteFailed as exc:
                disk_failure = disk_failure or exc
            except Exception as exc:  # noqa: BLE001 - a plugin's failure to copy must not stop training
                warn(
                    f"on_save of plugin {impl.plugin_name} failed at step {state.global_step} "
                    f"({type(exc).__name__}: {exc}); training goes on"
                )
        if disk_failure is not None:
            raise disk_failure

    def on_train_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.close()
