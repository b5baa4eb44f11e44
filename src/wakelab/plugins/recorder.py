"""Built-in ``recorder`` plugin: stream chosen rows' values, gradients, Adam state, logits, loss and lr every N steps.

Activate it with ``--plugin recorder`` (config ``plugins: [recorder]``) and choose what to keep in the ``recorder``
section (``wakelab config-keys | grep recorder``)::

    wakelab run --plugin recorder --set recorder.rows=new --set recorder.every=1 --set recorder.dtype=param

What one recorded step holds (fields, ``recorder.fields``):

- ``embeddings``  ``[rows, d]``  the rows' values after the optimizer step (decay included)
- ``grads``       ``[rows, d]``  the gradient the optimizer used: after base-row masking and clipping
- ``exp_avg``, ``exp_avg_sq``  ``[rows, d]``  AdamW's state after the step (zeros for rows that have none)
- ``logits``      ``[vocab]``    last position of the first sequence of the step's last micro-batch
- ``loss``        ``[]`` float32, the step's mean training loss; ``lr`` ``[]`` float64, the rate the step used

Rows (``recorder.rows``): ``new`` (the added tokens), ``all``, ``base``, a list of ids, ``sample:K`` (K ids drawn
from all rows with ``recorder.sample_seed``; ``sample:K:new`` / ``sample:K:base`` draw from those rows only), or a
path to a file of ids (``.json`` list, ``.safetensors`` with a ``token_ids`` tensor such as ``final/new_rows``, or
text with ids separated by spaces, commas or newlines; ``#`` starts a comment). Ids outside the vocabulary stop the
run at its start, before any training.

The starting state is recorded before the first step, at the starting step (0, or the checkpoint's step on a
resume): zero gradients, the optimizer state if there is one (a resumed run has it; otherwise zeros and the step is
listed under ``optimizer_state_missing`` in ``index.json``), and NaN for the values that only a step has (loss, lr,
logits). Then every step whose number is a multiple of ``recorder.every``, and always the last one.

Storage (``recorder.dtype``): ``bfloat16`` by default; ``param`` keeps the parameters' own dtype, so the values
are exact and AdamW's update can be reproduced from the recorded state. The recording is streamed through
:class:`wakelab.storage.recording.RecordingWriter` in shards of ``recorder.steps_per_shard`` steps into
``recorder.path`` (default ``<output_dir>/recording``; ``recording-from-step-N`` on a resume): memory stays flat,
a killed run leaves its finished shards readable, and a full disk stops the run with one clear message. On run end
``index.json`` and ``summary.txt`` become MLflow artifacts (shards too, per ``recorder.log_shards``) and the tag
``wakelab.recording.path`` says where the recording is. Read it with ``wakelab.storage.recording.open`` or
``wakelab recording info PATH``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

import wakelab
from wakelab import ConfigError, FieldSpec, RecordingError, RecordingWriter, recording_summary

ROW_FIELDS = ("embeddings", "grads", "exp_avg", "exp_avg_sq", "master")
OPTIMIZER_FIELDS = ("exp_avg", "exp_avg_sq")
MISSING_FLAG = "optimizer_state_missing"
PATH_TAG = "wakelab.recording.path"
_STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------------------------
# Config (the `recorder` section)

RECORDABLE_FIELDS = ("embeddings", "grads", "exp_avg", "exp_avg_sq", "logits", "loss", "lr", "master")


class RecorderConfig(wakelab.PluginConfig):
    """The `recorder` plugin: which rows and fields to record, how often, and how they are stored."""

    fields: tuple[str, ...] = Field(
        RECORDABLE_FIELDS[:-1],
        description=f"Fields to record, any of: {', '.join(RECORDABLE_FIELDS)} (`master`: the fp32 master copy of "
        "train.precision=fp32-master, always float32; the rows themselves under other settings).",
    )
    rows: str | list[int] = Field(
        "new",
        description=(
            "Rows to track: `new`, `all`, `base`, `sample:K` (seeded random K), a path to a file of ids, or a list."
        ),
    )
    sample_seed: int = Field(0, description="Seed of `sample:K`.")
    every: int = Field(1, ge=1, description="Record every N optimizer steps (and the starting state).")
    dtype: Literal["bfloat16", "float32", "float16", "param"] = Field(
        "bfloat16", description="Storage dtype; `param` keeps the parameters' own dtype for exact values."
    )
    logits: Literal["last", "none"] = Field(
        "last", description="Logits kept per step: `last` (last position of the first sequence) or `none`."
    )
    steps_per_shard: int = Field(
        10, ge=1, description="Recorded steps per safetensors shard (fewer when `buffer_mb` holds fewer steps)."
    )
    buffer_mb: float = Field(
        1024.0,
        gt=0,
        description=(
            "Most memory (MiB) the writer holds for recorded steps not yet on disk: the steps of the shard being "
            "built, the queue and the step being copied. Large steps get fewer steps per shard and a shorter "
            "queue (at least one each): at P1's 44,195 float32 new rows a step is 345 MiB."
        ),
    )
    path: str | None = Field(None, description="Recording directory; None: <output_dir>/recording.")
    log_shards: Literal["auto", "always", "never"] = Field(
        "auto", description="Log the shards as MLflow artifacts: auto = when the recording is under log_shards_max_mb."
    )
    log_shards_max_mb: float = Field(256.0, ge=0, description="Size limit (MiB) for `log_shards: auto`.")

    @field_validator("fields", mode="before")
    @classmethod
    def _known_fields(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        unknown = [v for v in value if v not in RECORDABLE_FIELDS]
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; choose from {', '.join(RECORDABLE_FIELDS)}")
        return tuple(value)


# ----------------------------------------------------------------------------------------------------------------------
# Which rows


def resolve_rows(spec: Any, num_total: int, num_base: int, seed: int = 0) -> torch.Tensor:
    """The token ids ``recorder.rows`` selects, as a LongTensor; a ``ConfigError`` names any id outside the vocabulary.

    ``spec`` is ``new``, ``all``, ``base``, ``sample:K[:all|new|base]``, a list of ids, a string of ids
    (``"3,7,9"``) or a path to a file of ids. Duplicates are dropped (first occurrence kept); order is kept.
    """
    if isinstance(spec, (list, tuple)):
        return _checked_ids(list(spec), num_total, "recorder.rows")
    if isinstance(spec, torch.Tensor):
        return _checked_ids(spec.flatten().tolist(), num_total, "recorder.rows")
    text = str(spec).strip()
    pools = {"all": (0, num_total), "new": (num_base, num_total), "base": (0, num_base)}
    if text in pools:
        start, stop = pools[text]
        return torch.arange(start, stop, dtype=torch.long)
    if text.startswith("sample:"):
        return _sample(text, pools, seed)
    if text and all(part.strip().lstrip("-").isdigit() for part in text.replace(",", " ").split()):
        return _checked_ids([int(part) for part in text.replace(",", " ").split()], num_total, "recorder.rows")
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"recorder.rows: '{text}' is not new, all, base, sample:K, a list of ids or an existing file of ids"
        )
    return _checked_ids(_read_id_file(path), num_total, f"recorder.rows file {path}")


def _sample(text: str, pools: dict[str, tuple[int, int]], seed: int) -> torch.Tensor:
    parts = text.split(":")
    pool_name = parts[2] if len(parts) == 3 else "all"
    if len(parts) not in (2, 3) or not parts[1].strip().isdigit() or pool_name not in pools:
        raise ConfigError(f"recorder.rows: '{text}' must be sample:K or sample:K:new|base|all, with K a whole number")
    count = int(parts[1])
    start, stop = pools[pool_name]
    if not 1 <= count <= stop - start:
        raise ConfigError(
            f"recorder.rows: {text} asks for {count} rows, but the pool '{pool_name}' has {stop - start} "
            f"(ids {start}..{stop - 1}); choose 1 <= K <= {stop - start}"
        )
    generator = torch.Generator().manual_seed(int(seed))
    picked = torch.randperm(stop - start, generator=generator)[:count] + start
    return picked.sort().values


def _read_id_file(path: Path) -> list[Any]:
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                if "token_ids" not in handle.keys():
                    raise ConfigError(f"recorder.rows file {path} has no 'token_ids' tensor")
                return handle.get_tensor("token_ids").flatten().tolist()
        text = path.read_text(encoding="utf-8")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable file: say which and why
        raise ConfigError(f"recorder.rows file {path} cannot be read: {exc}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"recorder.rows file {path} is not valid JSON: {exc}") from None
        if isinstance(data, dict) and "token_ids" in data:
            data = data["token_ids"]
        if not isinstance(data, list):
            raise ConfigError(f"recorder.rows file {path} must hold a JSON list of token ids")
        return data
    ids: list[Any] = []
    for line in text.splitlines():
        ids.extend(line.split("#", 1)[0].replace(",", " ").split())
    return ids


def _checked_ids(values: list[Any], num_total: int, where: str) -> torch.Tensor:
    ids: list[int] = []
    for value in values:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            ids.append(int(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: '{value}' is not a token id (ids are whole numbers)") from None
    if not ids:
        raise ConfigError(f"{where}: no token ids given")
    outside = sorted({i for i in ids if not 0 <= i < num_total})
    if outside:
        shown = ", ".join(str(i) for i in outside[:10]) + (
            f" and {len(outside) - 10} more" if len(outside) > 10 else ""
        )
        raise ConfigError(
            f"{where}: token id(s) {shown} are outside the vocabulary of {num_total} tokens "
            f"(valid ids: 0..{num_total - 1})"
        )
    return torch.tensor(list(dict.fromkeys(ids)), dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------------
# The recorder of one run


@dataclass
class Recorder:
    """One run's recording: which steps and rows, the writer, and the time spent in the hooks."""

    run: Any
    path: Path
    ids: torch.Tensor
    fields: tuple[str, ...]
    every: int
    last_step: int
    storage: torch.dtype | None  # None: `param`, the parameters' own dtype
    logits_width: int | None
    writer: RecordingWriter | None = None
    # Hand live rows to the writer, which copies them during the next step (False: copy them in the hook, as the
    # recorder once did; benchmarks/recorder_overhead.py measures both side by side).
    lend: bool = True
    stats: dict[str, float] = field(
        default_factory=lambda: {"hook_seconds": 0.0, "hook_calls": 0, "recorded_steps": 0, "max_hook_seconds": 0.0}
    )
    _warned_logits: bool = False

    def __post_init__(self) -> None:
        # What to ask RowAccess for: a range when the ids are one consecutive run (`all`, `new`, `base`), so it
        # hands back views at once instead of comparing 50,257 ids every step.
        run = wakelab.RowAccess.as_run(self.ids)
        self.select = run if run is not None else self.ids

    def wants(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last_step

    def row_fields(self) -> list[str]:
        return [f for f in self.fields if f in ROW_FIELDS]

    def specs(self, row_dtype: torch.dtype) -> dict[str, FieldSpec]:
        shape = (len(self.ids), self.run.rows.dim)
        specs: dict[str, FieldSpec] = {}
        for name in self.fields:
            if name == "master":  # fp32 masters exist to hold what bf16 cannot: never stored narrower
                specs[name] = FieldSpec(shape, torch.float32)
            elif name in ROW_FIELDS:
                specs[name] = FieldSpec(shape, row_dtype)
            elif name == "logits":
                specs[name] = FieldSpec((self.logits_width,), torch.float32 if self.storage is None else self.storage)
            elif name == "loss":
                specs[name] = FieldSpec((), torch.float32)
            elif name == "lr":
                specs[name] = FieldSpec((), torch.float64)
        return specs

    def gather(self, rows, optimizer, *, step: int, loss: float, lr: float, logits, initial: bool):
        """This step's tensors and its flags.

        Not copied: where the rows are one run of one tensor (``rows: all`` or ``new``) these are views of the live
        parameters, gradients and Adam state. The writer copies them on its own thread while the next step's
        forward and backward run, and ``mask_grads`` (the first thing before the next optimizer step changes
        anything) waits for that copy, so the recording holds exactly this step's values.
        """
        tensors: dict[str, Any] = {}
        flags: dict[str, bool] = {}
        if "embeddings" in self.fields:
            tensors["embeddings"] = rows.values(self.select, share=self.lend)
        if "grads" in self.fields:
            tensors["grads"] = (
                torch.zeros((len(self.ids), rows.dim), dtype=self.writer.fields["grads"].dtype)
                if initial
                else rows.grads(self.select, share=self.lend)
            )
        wanted = [f for f in OPTIMIZER_FIELDS if f in self.fields]
        if wanted:
            missing = False
            for name in wanted:
                value = rows.optimizer_state(optimizer, name, self.select, share=self.lend)
                if value is None:
                    missing = True
                    value = torch.zeros((len(self.ids), rows.dim), dtype=self.writer.fields[name].dtype)
                tensors[name] = value
            flags[MISSING_FLAG] = missing
        if "master" in self.fields:
            # train.precision=fp32-master steps these; before its first step (and under other settings) the rows
            # themselves are what the optimizer steps.
            master = rows.optimizer_state(optimizer, "master", self.select, share=self.lend)
            tensors["master"] = (master if master is not None else rows.values(self.select, share=self.lend)).float()
        if "logits" in self.fields:
            tensors["logits"] = self._logits(logits, step)
        if "loss" in self.fields:
            tensors["loss"] = torch.tensor(float(loss), dtype=torch.float32)
        if "lr" in self.fields:
            tensors["lr"] = torch.tensor(float(lr), dtype=torch.float64)
        return tensors, flags

    def _logits(self, logits, step: int) -> torch.Tensor:
        width = self.logits_width
        if logits is not None and tuple(logits.shape) == (width,):
            return logits.detach()
        if logits is not None and not self._warned_logits:
            self._warned_logits = True
            wakelab.warn(f"recorder: step {step}: logits have shape {tuple(logits.shape)}, the recording expects "
                         f"({width},); recording NaN logits where they differ")  # fmt: skip
        return torch.full((width,), math.nan, dtype=torch.float32)

    def append(self, step: int, **values) -> None:
        tensors, flags = self.gather(**values, step=step)
        self.writer.append(step, tensors, flags=flags or None, lend=self.lend)
        self.stats["recorded_steps"] += 1
        self.stats["last_step"] = step


#: The writer's queue when memory allows (RecordingWriter's default).
QUEUE_SIZE = 4


def step_bytes(specs: dict[str, FieldSpec]) -> int:
    """Bytes of one recorded step: every field's per-step shape in its storage dtype."""
    return sum(math.prod(spec.shape) * spec.dtype.itemsize for spec in specs.values())


def writer_depth(specs: dict[str, FieldSpec], steps_per_shard: int, buffer_mb: float) -> tuple[int, int]:
    """Steps per shard and queue size whose held steps (queue + shard + the one being copied) fit ``buffer_mb``.

    The writer holds up to ``queue + steps_per_shard + 1`` steps; at the defaults (4 + 10 + 1) and P1's new rows in
    float32 that was 5.2 GiB beside a 4 GiB run. At least one of each, so a step larger than the budget still
    records (three steps held)."""
    fit = int(buffer_mb * 2**20 // max(step_bytes(specs), 1))
    shard = max(1, min(steps_per_shard, fit - 2))
    return shard, max(1, min(QUEUE_SIZE, fit - shard - 1))


def _log(message: str) -> None:
    wakelab.log(f"recorder: {message}")


def _recording_path(run) -> tuple[Path, bool]:
    """Where to record, and whether an earlier recording there may be replaced."""
    cfg = run.config.recorder
    if cfg.path:
        return Path(cfg.path).expanduser(), False
    # The engine already agreed to reuse the output directory (fresh run or --overwrite); a resume records next to
    # the earlier recording, never over it (a continuation into a new directory, like Wordybird 3, records plainly).
    first = Path(run.output_dir) / "recording"
    if run.start_step == 0 or not first.exists():
        return first, True
    return Path(run.output_dir) / f"recording-from-step-{run.start_step}", True


def _logits_width(run) -> int:
    head = run.model.get_output_embeddings() if hasattr(run.model, "get_output_embeddings") else None
    width = getattr(head, "out_features", None)
    return int(width) if width else int(run.rows.num_total)


def _meta(run, rec: Recorder) -> dict[str, Any]:
    cfg, train = run.config.recorder, run.config.train
    return {
        "run_id": run.run_id,
        "strategy": run.rows.strategy,
        "num_base": int(run.rows.num_base),
        "vocab_size": int(run.rows.num_total),
        "rows": cfg.rows if isinstance(cfg.rows, str) else "list",
        "dtype": cfg.dtype,
        "param_dtype": str(run.rows.dtype).removeprefix("torch."),
        "every": rec.every,
        "start_step": int(run.start_step),
        "model": run.config.model.name_or_path,
        "adam_beta1": train.adam_beta1,
        "adam_beta2": train.adam_beta2,
        "adam_epsilon": train.adam_epsilon,
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm,
        "wakelab_version": wakelab.__version__,
        "config": run.config.model_dump(mode="json"),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Hooks


MASKS_FILE = "masks.safetensors"


def write_token_masks(path: Path, corpus_ids, vocab_size: int) -> None:
    """Which tokens occur in the training corpus (trained) and which never do (untrained), with the notebook's keys."""
    import numpy as np
    from safetensors.torch import save_file

    seen = np.zeros(vocab_size, dtype=bool)
    ids = np.asarray(corpus_ids)
    seen[ids[(ids >= 0) & (ids < vocab_size)]] = True
    trained = torch.from_numpy(seen)
    save_file(
        {
            "trained_mask": trained,
            "untrained_mask": ~trained,
            "trained_indices": torch.nonzero(trained).flatten(),
            "untrained_indices": torch.nonzero(~trained).flatten(),
        },
        str(path),
        metadata={"vocab_size": str(vocab_size), "untrained_share": f"{float((~trained).float().mean()):.6f}"},
    )


class Plugin:
    """The recorder plugin, one instance per run's plugin manager: it holds that run's recording."""

    def __init__(self) -> None:
        self.recorder: Recorder | None = None  # the run's recording; None when this process records nothing

    @wakelab.hookimpl
    def config_section(self):
        return "recorder", RecorderConfig

    @wakelab.hookimpl
    def on_run_start(self, run):
        """Check the rows against the vocabulary, open the recording and record the starting state."""
        self.recorder = None
        if not run.is_main_process:  # torchrun: one recording, from the first process
            return
        cfg = run.config.recorder
        fields = tuple(f for f in cfg.fields if not (f == "logits" and cfg.logits == "none"))
        if cfg.logits not in ("last", "none"):
            raise ConfigError(f"recorder.logits: got '{cfg.logits}'; use last or none")
        if not fields:
            raise ConfigError("recorder.fields: nothing to record; name at least one field")
        rows = run.rows
        ids = resolve_rows(cfg.rows, rows.num_total, rows.num_base, cfg.sample_seed)
        if any(f in ROW_FIELDS for f in fields) and len(ids) == 0:
            raise ConfigError(
                f"recorder.rows={cfg.rows} selects no rows (this run adds no tokens); use all, base, sample:K or a list"
            )
        path, replace = _recording_path(run)
        storage = None if cfg.dtype == "param" else _STORAGE_DTYPES[cfg.dtype]
        rec = Recorder(
            run=run,
            path=path,
            ids=ids,
            fields=fields,
            every=cfg.every,
            last_step=int(run.config.train.max_steps),
            storage=storage,
            logits_width=_logits_width(run) if "logits" in fields else None,
        )
        self.recorder = rec
        started = time.perf_counter()
        # `param`: the dtype the rows are gathered in (the holding tensor's; fp32 when fp32 base rows are mixed in).
        row_dtype = storage or (rows.values(ids).dtype if len(ids) and rec.row_fields() else rows.dtype)
        specs = rec.specs(row_dtype)
        steps_per_shard, queue_size = writer_depth(specs, cfg.steps_per_shard, cfg.buffer_mb)
        if steps_per_shard < cfg.steps_per_shard:
            _log(f"a recorded step is {step_bytes(specs) / 2**20:,.0f} MiB: {steps_per_shard} step(s) per shard and "
                 f"{queue_size} queued keep the writer within recorder.buffer_mb={cfg.buffer_mb:g}")  # fmt: skip
        rec.writer = RecordingWriter(
            path,
            specs,
            token_ids=ids.tolist(),
            meta=_meta(run, rec),
            steps_per_shard=steps_per_shard,
            queue_size=queue_size,
            overwrite=replace,
        )
        rec.append(
            int(run.start_step),
            rows=rows,
            optimizer=run.optimizer,
            loss=math.nan,
            lr=math.nan,
            logits=None,
            initial=True,
        )
        if run.corpus_ids is not None:
            write_token_masks(path / MASKS_FILE, run.corpus_ids, rows.num_total)
        where = (
            f"{len(ids)} rows ({cfg.rows if isinstance(cfg.rows, str) else 'list'})" if rec.row_fields() else "no rows"
        )
        _log(f"recording {', '.join(fields)} of {where} every {cfg.every} step(s) as {cfg.dtype} into {path}")
        spent = time.perf_counter() - started
        rec.stats["hook_seconds"] += spent
        rec.stats["start_seconds"] = spent

    @wakelab.hookimpl
    def mask_grads(self, ctx):
        """Before the optimizer step changes anything: wait until the writer has copied the last recorded step.

        The recorder changes no gradient; ``mask_grads`` is simply the first hook of every optimizer step, ahead of
        clipping, ``mask``'s decay and the step. The copy has had the whole forward and backward pass to run, so this
        wait is normally nothing; it is counted in the recorder's hook time all the same.
        """
        rec = self.recorder
        if rec is None or rec.writer is None:
            return
        started = time.perf_counter()
        rec.writer.wait_lent()
        spent = time.perf_counter() - started
        rec.stats["hook_seconds"] += spent
        rec.stats["wait_seconds"] = rec.stats.get("wait_seconds", 0.0) + spent

    @wakelab.hookimpl
    def on_step_end(self, state):
        """Record this step when it is one of the chosen steps."""
        rec = self.recorder
        if rec is None or rec.writer is None:
            return
        started = time.perf_counter()
        try:
            if rec.wants(state.step):
                rec.append(
                    int(state.step),
                    rows=state.rows,
                    optimizer=state.optimizer,
                    loss=state.loss,
                    lr=state.lr,
                    logits=state.logits,
                    initial=False,
                )
        finally:
            spent = time.perf_counter() - started
            rec.stats["hook_seconds"] += spent
            rec.stats["hook_calls"] += 1
            rec.stats["max_hook_seconds"] = max(rec.stats["max_hook_seconds"], spent)

    @wakelab.hookimpl
    def on_run_end(self, run, status):
        """Finish the recording (complete only for a finished run) and log it to MLflow."""
        rec = self.recorder
        if rec is None or rec.run is not run:
            return
        self.recorder = None
        if rec.writer is None:
            return
        close_error: RecordingError | None = None
        try:
            rec.writer.close(complete=status == "FINISHED")
        except RecordingError as exc:
            close_error = exc
        try:
            _log_to_mlflow(run, rec)
        finally:
            if close_error is not None and status == "FINISHED":
                raise close_error
        if close_error is not None:
            _log(str(close_error))


def _log_to_mlflow(run, rec: Recorder) -> None:
    cfg = run.config.recorder
    path = rec.path
    artifact_path = path.name
    index = path / "index.json"
    run.set_tags({PATH_TAG: str(path.resolve())})
    if not index.is_file():
        return
    run.log_artifact(index, artifact_path)
    try:
        text = recording_summary(path)
        (path / "summary.txt").write_text(text + "\n", encoding="utf-8")
        run.log_artifact(path / "summary.txt", artifact_path)
    except (OSError, RecordingError) as exc:  # a full disk: the index is logged, the summary cannot be
        wakelab.warn(f"recorder: no summary.txt for {path}: {exc}")
    shards = sorted(path.glob("shard-*.safetensors"))
    listed = {s["file"] for s in json.loads(index.read_text()).get("shards", [])}
    shards = [s for s in shards if s.name in listed]
    size_mb = sum(s.stat().st_size for s in shards) / 2**20
    log_shards = cfg.log_shards == "always" or (cfg.log_shards == "auto" and size_mb <= cfg.log_shards_max_mb)
    for shard in shards if log_shards else []:
        run.log_artifact(shard, artifact_path)
    run.set_tags({"wakelab.recording.shards_logged": str(bool(log_shards and shards)).lower()})
    if not log_shards and shards:
        _log(f"{size_mb:.1f} MiB of shards kept at {path} only (recorder.log_shards={cfg.log_shards}, "
             f"log_shards_max_mb={cfg.log_shards_max_mb:g})")  # fmt: skip
    steps = max(int(rec.stats["recorded_steps"]), 1)
    run.log_metrics(
        {
            "recorder_seconds": float(rec.stats["hook_seconds"]),
            "recorder_ms_per_step": 1000.0 * float(rec.stats["hook_seconds"]) / steps,
            "recorder_mib": size_mb,
        },
        int(rec.stats.get("last_step", run.start_step)),
    )
