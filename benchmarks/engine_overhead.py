"""Training-loop overhead of a wakelab run (all plugins idle) against a plain ``transformers.Trainer``.

Both sides train the same tiny Llama (hidden 128, 4 layers, tied), the same expanded tokenizer, corpus blocks and
``TrainingArguments``, in one process; the difference is the Trainer:

- **wakelab**: a real ``wakelab.run.engine.run(config)`` (MLflow run in a temporary SQLite store, ``train.trainable=
  tokens``, progress bar on), whose ``WakelabTrainer`` + ``HookBridge`` come from the engine's own
  ``_build_trainer``. The only plugin active is the one a default run activates, ``spherical`` for the init; it
  has no training-time hook, so every training hook call finds no plugin (all plugins idle).
- **plain**: a stock ``transformers.Trainer`` built right after the engine built its own: the same model folder
  loaded, expanded and split by ``setup_trainable_rows`` exactly as the engine does (so the very same tensors
  train; the new rows are copied from the engine's model), a copy of the engine's ``TrainingArguments``, its
  dataset and collator; no callbacks of ours (Trainer's ``PrinterCallback`` removed, as the engine removes it).
  Not a deep copy of the engine's model: ``from_pretrained`` leaves weights in the memory-mapped safetensors file
  (8-byte aligned), and a deep copy's private, aligned memory alone made a plain Trainer ~3% faster here.

Only the training loop is timed, never set-up. This machine's load swings by 5x within seconds (other jobs share
its 2 cores), so whole runs timed one after the other (A, B, A, B) gave paired ratios from 0.4 to 1.6. The two
trainers therefore run in lock step: each trains in a thread of its own (the engine's run in one, the plain
Trainer in another, neither in the main thread) and a baton lets exactly one of them do one
optimizer step at a time (wakelab step 1, plain step 1, wakelab step 2, ...), so each pair of steps sees the
same load. A step is timed from the moment its trainer gets the baton to its ``on_step_end`` (our callback runs
last), which includes the data loader, forward, backward, clipping, optimizer, scheduler, every callback, and the
previous step's logging (MLflow metrics for wakelab). The first ``--warmup`` steps are left out. Each repeat
("pair") is a fresh engine run; the side that steps first alternates between repeats; the figure judged is the
median over repeats of (wakelab steps/s) / (plain steps/s). ``--control`` replaces the engine's Trainer by a
plain one as well (an A/A run): its ratio shows the harness's own bias, which should be ~1.0.

Run:  python benchmarks/engine_overhead.py [--pairs 9] [--steps 60] [--warmup 10]
Target: wakelab steps/s / plain steps/s >= 0.99.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from wakelab.testing import COINED, build_tiny_llama, make_text

TARGET = 0.99


class Baton:
    """Lets two trainers take turns, one optimizer step each, so their steps see the same machine load."""

    def __init__(self, first: str, second: str, on_ready=None):
        self._cond = threading.Condition()
        self._other = {first: second, second: first}
        self._turn = first
        self._finished: set[str] = set()
        self._ready = threading.Barrier(2, action=on_ready)

    def start(self, me: str) -> None:
        self._ready.wait()  # both trainers built their optimizer and data loader before anyone steps
        self.take(me)

    def take(self, me: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == me or self._other[me] in self._finished)

    def give(self, me: str) -> None:
        with self._cond:
            self._turn = self._other[me]
            self._cond.notify_all()

    def finish(self, me: str) -> None:
        with self._cond:
            self._finished.add(me)
            self._turn = self._other[me]
            self._cond.notify_all()


def make_step_timer(name: str, baton: Baton):
    from transformers import TrainerCallback

    class LockStepTimer(TrainerCallback):
        """Times each optimizer step from the moment this trainer gets its turn to its ``on_step_end``.

        Added last, so every other callback's ``on_step_end`` is inside the step; the previous step's logging
        (``_maybe_log_save_evaluate`` runs after ``on_step_end``) falls into the next step, so it is counted too.
        """

        def __init__(self):
            self.durations: list[float] = []
            self.cpu: list[float] = []  # process CPU seconds (all threads) spent during each step
            self._start = 0.0
            self._cpu_start = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            baton.start(name)
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.durations.append(time.perf_counter() - self._start)
            self.cpu.append(time.process_time() - self._cpu_start)
            baton.give(name)
            baton.take(name)
            if state.global_step >= state.max_steps:
                baton.finish(name)  # both go on to their (untimed) end of training together
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

    return LockStepTimer()


def one_pair(first: str, base_overrides: dict, run_index: int, progress: bool, control: bool = False) -> dict:
    """One engine run (wakelab's Trainer) and a plain Trainer on the same model, loaded alike, in lock step."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from wakelab import config as config_mod
    from wakelab import model as model_mod
    from wakelab.data import corpus as data_mod
    from wakelab.rows import setup_trainable_rows
    from wakelab.run import engine

    gc_log: list[tuple[str, float]] = []
    gc_start: dict[int, float] = {}
    gc_counting = threading.Event()

    def freeze_heap():
        """Both trainers are ready: collect once and freeze the heap, so the rest of the run's collections only
        scan what training allocates. Without this, a full collection over the millions of objects the imports
        and set-up leave (hundreds of ms) lands on whichever thread trips the threshold: noise of several % per
        run that has nothing to do with either Trainer."""
        gc.collect()
        gc.freeze()
        gc_counting.set()

    baton = Baton(first, "plain" if first == "wakelab" else "wakelab", on_ready=freeze_heap)
    timers = {"wakelab": make_step_timer("wakelab", baton), "plain": make_step_timer("plain", baton)}
    original = engine._build_trainer
    side: dict = {}

    def plain_trainer(model, args, dataset, tokenizer):
        plain = Trainer(
            model=model, args=args, train_dataset=dataset, data_collator=data_mod.collate, processing_class=tokenizer
        )
        plain.remove_callback(PrinterCallback)
        plain.remove_callback(ProgressCallback)
        return plain

    def load_like_engine(config, tokenizer, engine_rows):
        """The plain side's model, loaded and set up as the engine does (not a deep copy: from_pretrained leaves the
        weights in the memory-mapped safetensors file, 8-byte aligned, and a copy's aligned private memory alone
        made a plain Trainer ~3% faster here), with the engine model's new-row values."""
        model = model_mod.load_model(config.model, model_mod.model_source(config.model))
        model_mod.expand_embeddings(model, len(tokenizer))
        plain_rows = setup_trainable_rows(model, engine_rows.num_base, engine_rows.strategy)
        plain_rows.load_rows(engine_rows.new_ids, engine_rows.values(engine_rows.new_ids))
        return model

    spent = {"seconds": 0.0}
    by_event: dict[str, float] = {}

    def timed(fn, name):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                spent["seconds"] += dt
                by_event[name] = by_event.get(name, 0.0) + dt

        return wrapper

    def instrument(trainer):
        """Count the time spent in wakelab's per-step code: HookBridge's step events (MLflow logging included) and
        the base-row masking seam. (The two one-line additions to training_step/compute_loss are not counted.)"""
        for cb in trainer.callback_handler.callbacks:
            if type(cb).__name__ == "HookBridge":
                for event in ("on_pre_optimizer_step", "on_step_end", "on_log"):
                    setattr(cb, event, timed(getattr(cb, event), event))
        trainer._mask_once = timed(trainer._mask_once, "_mask_once")

    def build(*args, **kwargs):
        trainer = original(*args, **kwargs)
        side["rows"] = trainer.rows
        if control:  # A/A check of the harness: the engine's side trains with a plain Trainer too
            trainer = plain_trainer(trainer.model, trainer.args, trainer.train_dataset, trainer.processing_class)
        else:
            instrument(trainer)
        trainer.add_callback(timers["wakelab"])
        # The plain side: the same model (loaded and split alike), args, dataset and collator; no hooks.
        plain = plain_trainer(
            load_like_engine(config, trainer.processing_class, side["rows"]),
            copy.deepcopy(trainer.args),
            trainer.train_dataset,
            trainer.processing_class,
        )
        plain.add_callback(timers["plain"])

        def train_plain():
            try:
                plain.train()
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                side["error"] = exc
                baton.finish("plain")

        side["trainer"] = trainer
        side["plain"] = plain
        side["thread"] = threading.Thread(target=train_plain, name="plain-trainer", daemon=True)
        side["thread"].start()
        return trainer

    overrides = dict(base_overrides, output_dir=f"out-{run_index}", **{"tracking.run_name": f"pair-{run_index}"})
    config = config_mod.build_config(preset=None, overrides=overrides)

    def run_engine():
        try:
            engine.run(config, overwrite=True, progress=progress)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            side["engine_error"] = exc
            baton.finish("wakelab")

    # The engine runs in a thread of its own too, so neither side is the main thread.
    engine._build_trainer = build

    def on_gc(phase, info):
        if not gc_counting.is_set():
            return
        if phase == "start":
            gc_start[threading.get_ident()] = time.perf_counter()
        elif threading.get_ident() in gc_start:
            gc_log.append((threading.current_thread().name, time.perf_counter() - gc_start.pop(threading.get_ident())))

    gc.callbacks.append(on_gc)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # the engine's log lines and bar
            engine_thread = threading.Thread(target=run_engine, name="wakelab-engine")
            engine_thread.start()
            engine_thread.join()
            if "thread" in side:
                side["thread"].join()
    finally:
        gc.callbacks.remove(on_gc)
        gc.unfreeze()
        engine._build_trainer = original
    for key in ("engine_error", "error"):
        if key in side:
            raise side[key]
    return {
        "callbacks": {
            kind: [type(cb).__name__ for cb in side[key].callback_handler.callbacks]
            for kind, key in (("wakelab", "trainer"), ("plain", "plain"))
        },
        "classes": {"wakelab": type(side["trainer"]).__name__, "plain": type(side["plain"]).__name__},
        "steps": {"wakelab": side["trainer"].state.global_step, "plain": side["plain"].state.global_step},
        "durations": {kind: timer.durations for kind, timer in timers.items()},
        "cpu": {kind: timer.cpu for kind, timer in timers.items()},
        "gc_ms": {
            kind: 1000 * sum(dt for name, dt in gc_log if name == thread)
            for kind, thread in (("wakelab", "wakelab-engine"), ("plain", "plain-trainer"))
        },
        "wakelab_code_s_per_step": spent["seconds"] / max(1, side["trainer"].state.global_step),
        "wakelab_code_ms_by_event": {
            k: v * 1000 / max(1, side["trainer"].state.global_step) for k, v in by_event.items()
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=9, help="wakelab/plain pairs (>= 5)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--no-progress", action="store_true", help="run wakelab without its progress bar")
    parser.add_argument("--dump", type=Path, help="write every step's wall and CPU times to this JSON file")
    parser.add_argument(
        "--control",
        action="store_true",
        help="A/A check of the harness: the engine's side trains with a plain Trainer as well",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra config override for the wakelab side (YAML value), e.g. train.loss_chunk_tokens=null",
    )
    args = parser.parse_args()
    if args.steps <= args.warmup + 1:
        parser.error("--steps must exceed --warmup + 1")

    if args.dump:
        args.dump = args.dump.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="wakelab-bench-"))
    # Before mlflow or wakelab is imported: a private tracking store and cache, and a working directory of our own.
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["WAKELAB_CACHE"] = str(tmp / "cache")
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        os.environ.pop(key, None)
    os.chdir(tmp)

    try:
        return measure(args, tmp)
    finally:
        os.chdir(Path(__file__).resolve().parent)
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args, tmp: Path) -> int:
    import torch
    import transformers

    model_dir = build_tiny_llama(tmp / "model", max(256, args.seq_len), args.hidden, args.layers)
    (tmp / "corpus.txt").write_text(make_text(1, 4000), encoding="utf-8")
    (tmp / "heldout.txt").write_text(make_text(2, 100), encoding="utf-8")
    (tmp / "lexicon.txt").write_text("\n".join(COINED) + "\n", encoding="utf-8")
    overrides = {
        "model.name_or_path": str(model_dir),
        "vocab.lexicon": str(tmp / "lexicon.txt"),
        "data.corpus": str(tmp / "corpus.txt"),
        "data.heldout": str(tmp / "heldout.txt"),
        "data.seq_len": args.seq_len,
        "train.trainable": "tokens",
        "train.max_steps": args.steps,
        "train.batch_size": args.batch,
        "train.logging_steps": args.logging_steps,
        "train.eval_perplexity": False,
        "tracking.log_tokenizer": False,
        "tracking.experiment": "engine-overhead",
    }
    for item in args.sets:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)

    print(
        f"engine_overhead: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus, {platform.machine()}"
    )
    print(
        f"model: tiny Llama hidden={args.hidden} layers={args.layers} tied; seq_len={args.seq_len} "
        f"batch={args.batch}; {args.steps} steps per run, first {args.warmup} untimed; "
        f"logging every {args.logging_steps}; progress bar {'off' if args.no_progress else 'on'} (to /dev/null)"
    )
    if args.control:
        print("CONTROL RUN (A/A): the 'wakelab' side below is a plain Trainer in the engine's run; expect ratio ~1.0")

    dump = []
    rows = []
    own_share = []
    cpu_ratios = []
    own_events: dict[str, list[float]] = {}
    for pair in range(1, args.pairs + 1):
        first = "wakelab" if pair % 2 else "plain"
        got = one_pair(first, overrides, pair, not args.no_progress, args.control)
        if pair == 1:
            for kind in ("wakelab", "plain"):
                print(f"{kind:7s} side: {got['classes'][kind]}, callbacks {got['callbacks'][kind]}")
        assert got["steps"]["wakelab"] == got["steps"]["plain"] == args.steps, got["steps"]
        dump.append({"pair": pair, "first": first, "wall_s": got["durations"], "cpu_s": got["cpu"]})
        timed = {kind: got["durations"][kind][args.warmup :] for kind in ("wakelab", "plain")}
        sps = {kind: len(d) / sum(d) for kind, d in timed.items()}
        med_ms = {kind: statistics.median(d) * 1000 for kind, d in timed.items()}
        ratio = sps["wakelab"] / sps["plain"]
        step_ratio = statistics.median(p / w for w, p in zip(timed["wakelab"], timed["plain"], strict=True))
        cpu = {kind: sum(got["cpu"][kind][args.warmup :]) for kind in ("wakelab", "plain")}
        cpu_ratios.append(cpu["plain"] / cpu["wakelab"])
        rows.append((sps, ratio, step_ratio))
        own_ms = got["wakelab_code_s_per_step"] * 1000
        own_share.append(own_ms / med_ms["wakelab"])
        for event, ms in got["wakelab_code_ms_by_event"].items():
            own_events.setdefault(event, []).append(ms)
        print(
            f"pair {pair}: {first:>7s} first | wakelab {sps['wakelab']:6.2f} steps/s ({med_ms['wakelab']:6.1f} ms "
            f"median) | plain {sps['plain']:6.2f} steps/s ({med_ms['plain']:6.1f} ms median) | ratio {ratio:.3f} "
            f"(median step-pair ratio {step_ratio:.3f}, CPU-time ratio {cpu_ratios[-1]:.3f})"
            + ("" if args.control else f" | in wakelab code {own_ms:.2f} ms/step")
            + f" | GC in training: wakelab {got['gc_ms']['wakelab']:.0f} ms, plain {got['gc_ms']['plain']:.0f} ms",
            flush=True,
        )

    if args.dump:
        args.dump.write_text(json.dumps(dump))
    ratios = [r for _, r, _ in rows]
    wl = [s["wakelab"] for s, _, _ in rows]
    pl = [s["plain"] for s, _, _ in rows]
    median_ratio = statistics.median(ratios)
    print()
    print(f"wakelab steps/s : median {statistics.median(wl):.2f} (min {min(wl):.2f}, max {max(wl):.2f})")
    print(f"plain   steps/s : median {statistics.median(pl):.2f} (min {min(pl):.2f}, max {max(pl):.2f})")
    print(f"paired ratios   : {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"median of per-step paired ratios: {statistics.median(r for _, _, r in rows):.3f}")
    print(
        f"median CPU-time ratio (plain CPU s / wakelab CPU s over the timed steps): {statistics.median(cpu_ratios):.3f}"
    )
    if not args.control:
        print(
            f"time in wakelab's per-step code (HookBridge events incl. MLflow logging, masking seam): median "
            f"{statistics.median(own_share):.2%} of a median step; ms/step by event: "
            + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in own_events.items())
        )
    verdict = "PASS" if median_ratio >= TARGET else "FAIL"
    print(
        f"engine overhead: median paired ratio wakelab/plain steps/s = {median_ratio:.3f} "
        f"(target >= {TARGET}) {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
