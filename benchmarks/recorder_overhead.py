"""What the `recorder` plugin costs on the Wordybird shape. Prints figures; asserts nothing.

Shape: GPT-2 built from a config (vocab 50,257, n_embd 64, 2 layers, 2 heads, n_positions 128) in bf16, batch
32 x 128 random tokens, `train.trainable=full`, every field (embeddings, grads, exp_avg, exp_avg_sq, logits, loss,
lr) of all 50,257 rows every step, stored as bf16 (~25 MiB a step). WakelabTrainer is driven as the engine drives
it (same HookBridge, same hooks), without MLflow.

Figures (targets in brackets):

1. recorder share of step time: time spent inside the recorder's hooks / step time          [<= 2 %]
2. steps/s with / without the recorder, paired alternating runs (ABBA), median ratio       [>= 0.95]
   The speed runs write one step per shard, so the background thread writes (and fsyncs) during the timed steps,
   as in a long run; the final flush at run end is reported apart.
3. peak RSS after 100 recorded steps / after 10, in a fresh process                        [<= 1.05]
   The recorder's memory does not depend on the batch, so this run uses --rss-batch (default 1) to fit the time;
   the same run without the recorder, and the peak every 10 steps, show what is the recorder's and whether it grows.
4. the writer's throughput (--throughput-steps Wordybird-sized steps, 100 by default as the notebook records, appended
   back to back until closed) against `dd if=/dev/zero bs=1M oflag=direct` writing as many bytes on the same disk,
   alternating (--throughput-rounds, median of the rounds' ratios: the disk's speed drifts on a shared machine),
   and what training actually needs.                                                         [>= 0.6]

    .venv/bin/python benchmarks/recorder_overhead.py                 # ~9 minutes on 2 CPU cores
    .venv/bin/python benchmarks/recorder_overhead.py --pairs 5 --timed-steps 5
    .venv/bin/python benchmarks/recorder_overhead.py --writer-only   # figure 4, and the recorder's hooks in a
                                                                     # simulated 140 ms step (target <= 2 % of it),
                                                                     # lent and copied side by side; ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

VOCAB, N_EMBD, LAYERS, HEADS, SEQ = 50257, 64, 2, 2, 128


# ----------------------------------------------------------------------------------------------------------------------
# One training run driven like the engine drives it


class RandomBlocks(torch.utils.data.Dataset):
    def __init__(self, count: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (count, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=N_EMBD, n_layer=LAYERS, n_head=HEADS, n_positions=SEQ)
    return GPT2LMHeadModel(config).to(torch.bfloat16)


def train_once(workdir: Path, *, steps: int, batch: int, record: bool, samples_at=(), steps_per_shard: int = 10):
    """Train ``steps`` steps; return per-step end times, the recorder's stats and memory samples."""
    from transformers import TrainerCallback, TrainingArguments

    from wakelab.config import build_config
    from wakelab.data.corpus import collate
    from wakelab.hooks import registry
    from wakelab.hooks.context import RunContext
    from wakelab.plugins import recorder as recorder_plugin
    from wakelab.rows import setup_trainable_rows
    from wakelab.run.trainer import HookBridge, WakelabTrainer

    rec_path = workdir / f"rec-{time.monotonic_ns()}"
    config = build_config(
        None,
        None,
        {
            "plugins": ["recorder"],  # the recorder section is validated only with the plugin named
            "model.dtype": "bfloat16",
            "train.trainable": "full",
            "train.max_steps": steps,
            "train.batch_size": batch,
            "data.seq_len": SEQ,
            "recorder.rows": "all",
            "recorder.every": 1,
            "recorder.dtype": "bfloat16",
            "recorder.steps_per_shard": steps_per_shard,
            "recorder.path": str(rec_path),
            "output_dir": str(workdir / "trainer"),
        },
    )
    model = build_model()
    rows = setup_trainable_rows(model, VOCAB, "full")
    pm = registry.make_manager()
    if record:
        registry.register(pm, recorder_plugin, "recorder")
    run_ctx = RunContext(config=config, output_dir=workdir, run_id=None, model=model, tokenizer=None, rows=rows)

    ends: list[float] = []
    memory: dict[int, dict[str, float]] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # runs after HookBridge: the recorder is inside
            ends.append(time.perf_counter())
            if state.global_step in samples_at:
                memory[state.global_step] = {
                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "rss_mib": _rss_mib(),
                }

    def on_start(optimizer):
        run_ctx.optimizer = optimizer
        run_ctx.start_step = trainer.state.global_step
        pm.hook.on_run_start(run=run_ctx)

    t = config.train
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=t.lr,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=10**6,
        save_strategy="no",
        seed=0,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    bridge = HookBridge(lambda: trainer, on_start, lambda m, s: None, lambda: {}, workdir, None)
    trainer = WakelabTrainer(
        model=model,
        args=args,
        train_dataset=RandomBlocks(max(steps * batch, batch)),
        data_collator=collate,
        callbacks=[bridge, Clock()],
        rows=rows,
        pm=pm,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    active = pm.get_plugin("recorder").recorder if record else None  # the run's recording, on the plugin instance
    stats = dict(active.stats) if active is not None else {}
    if active is not None:
        stats["writer"] = dict(active.writer.stats)
    close_started = time.perf_counter()
    pm.hook.on_run_end(run=run_ctx, status="FINISHED")
    closed = time.perf_counter()
    stats["close_seconds"] = closed - close_started
    size = sum(f.stat().st_size for f in rec_path.glob("*")) if rec_path.exists() else 0
    shutil.rmtree(rec_path, ignore_errors=True)
    return {"ends": ends, "closed": closed, "stats": stats, "memory": memory, "bytes": size}


def _rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover
        return float("nan")


# ----------------------------------------------------------------------------------------------------------------------
# The figures


def speed_pairs(workdir: Path, pairs: int, timed_steps: int, batch: int) -> dict:
    """ABBA-alternating runs with and without the recorder; step 1 is warm-up and not timed."""
    ratios, shares, hook_ms, close_s, step_s = [], [], [], [], {"with": [], "without": []}
    for i in range(pairs):
        order = (True, False) if i % 2 == 0 else (False, True)
        rates = {}
        for record in order:
            # One step per shard: every step's shard is written by the background thread during the next step,
            # so the timed steps pay for the writing as a long run does (shards of 10 would all wait for close).
            out = train_once(workdir, steps=1 + timed_steps, batch=batch, record=record, steps_per_shard=1)
            ends = out["ends"]
            window = ends[-1] - ends[0]  # end of the warm-up step -> end of the last step
            rates[record] = timed_steps / window
            step_s["with" if record else "without"].append(window / timed_steps)
            if record:
                s = out["stats"]
                per_step_hook = (s["hook_seconds"] - s.get("start_seconds", 0.0)) / max(s["hook_calls"], 1)
                hook_ms.append(1000 * per_step_hook)
                shares.append(per_step_hook / (window / timed_steps))
                close_s.append(s["close_seconds"])
            print(f"  pair {i + 1}: {'with   ' if record else 'without'} recorder: {rates[record]:.4f} steps/s "
                  f"({window / timed_steps:.2f} s/step)", flush=True)  # fmt: skip
        ratios.append(rates[True] / rates[False])
    return {"ratios": ratios, "shares": shares, "hook_ms": hook_ms, "close_s": close_s, "step_s": step_s}


def rss_run(workdir: Path, steps: int, batch: int, record: bool = True) -> dict:
    out = train_once(workdir, steps=steps, batch=batch, record=record, samples_at=range(10, steps + 1, 10))
    s = out["stats"]
    if not record:
        return {"memory": out["memory"], "steps": steps}
    return {
        "writer": s.get("writer", {}),
        "memory": out["memory"],
        "hook_ms": 1000 * (s["hook_seconds"] - s.get("start_seconds", 0.0)) / max(s["hook_calls"], 1),
        "max_hook_ms": 1000 * s["max_hook_seconds"],
        "step_s": (out["ends"][-1] - out["ends"][0]) / max(len(out["ends"]) - 1, 1),
        "bytes": out["bytes"],
        "steps": steps,
    }


def writer_throughput(workdir: Path, steps: int) -> dict:
    from wakelab.storage.recording import FieldSpec, RecordingWriter

    bf = torch.bfloat16
    fields = {name: FieldSpec((VOCAB, N_EMBD), bf) for name in ("embeddings", "grads", "exp_avg", "exp_avg_sq")}
    fields.update(logits=FieldSpec((VOCAB,), bf), loss=FieldSpec((), torch.float32), lr=FieldSpec((), torch.float64))
    g = torch.Generator().manual_seed(0)
    step = {name: torch.randn(spec.shape or (), generator=g).to(spec.dtype) for name, spec in fields.items()}
    per_step = sum(spec.nbytes for spec in fields.values())
    path = workdir / "throughput"
    started = time.perf_counter()
    with RecordingWriter(path, fields, steps_per_shard=10) as writer:
        for i in range(steps):
            writer.wait_lent()
            writer.append(i, step, lend=True)  # as the recorder appends host tensors
    seconds = time.perf_counter() - started
    shutil.rmtree(path, ignore_errors=True)
    return {"mib_s": per_step * steps / 2**20 / seconds, "per_step_mib": per_step / 2**20, "steps": steps}


def simulated_step_share(workdir: Path, steps: int, step_s: float, lend: bool) -> dict:
    """What the recorder's hooks cost a training thread whose step takes ``step_s`` (slept: a GPU step where the CPU
    waits), with the writer thread writing meanwhile: the notebook's 140 ms Wordybird step.

    The recorder itself records every field of all rows of a bf16 ``[50257, 64]`` matrix with AdamW state, through
    ``RowAccess``. ``lend``: as it does now (views of the live tensors; the writer copies them during the next
    step, and the hook before that step's optimizer step waits for the copy, counted here). Otherwise: the hook
    copies every field itself, as it once did.
    """
    from wakelab.plugins.recorder import RECORDABLE_FIELDS, Recorder
    from wakelab.rows import RowAccess, _Segment
    from wakelab.storage.recording import RecordingWriter

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(VOCAB, N_EMBD).to(torch.bfloat16))
    weight.grad = torch.randn_like(weight)
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    optimizer.step()
    rows = RowAccess("full", VOCAB, VOCAB, [_Segment(0, VOCAB, weight)])
    logits = torch.randn(VOCAB)
    path = workdir / f"simulated-{'lent' if lend else 'copied'}"
    rec = Recorder(
        run=SimpleNamespace(rows=rows), path=path, ids=torch.arange(VOCAB), fields=RECORDABLE_FIELDS[:-1], every=1,
        last_step=steps, storage=torch.bfloat16, logits_width=VOCAB, lend=lend,
    )  # fmt: skip
    hook_s = []
    with RecordingWriter(path, rec.specs(torch.bfloat16), steps_per_shard=10) as writer:
        rec.writer = writer
        for i in range(1, steps + 1):
            time.sleep(step_s)  # forward and backward
            started = time.perf_counter()
            writer.wait_lent()  # the recorder's mask_grads, before the optimizer step
            waited = time.perf_counter()
            with torch.no_grad():  # the optimizer step changes what the last recorded step lent
                weight.add_(1.0)
            moved = time.perf_counter()
            rec.append(i, rows=rows, optimizer=optimizer, loss=1.0, lr=1e-3, logits=logits, initial=False)
            hook_s.append(waited - started + time.perf_counter() - moved)
    shutil.rmtree(path, ignore_errors=True)
    timed = hook_s[5:]  # after the first steps, which fill the writer's buffer pools
    return {
        "median_ms": 1000 * statistics.median(timed),
        "mean_ms": 1000 * statistics.mean(timed),
        "share": statistics.mean(timed) / step_s,
        "steps": len(timed),
    }


def dd_throughput(workdir: Path, mib: int = 512) -> dict:
    """``dd``'s throughput writing ``mib`` MiB (as much as the writer wrote: big writes run slower on many disks)."""
    target = workdir / "dd.bin"
    results = {}
    for flag in ("oflag=direct", "conv=fdatasync"):
        try:
            done = subprocess.run(
                ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mib}", flag],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
        finally:
            target.unlink(missing_ok=True)
        match = re.search(r"(\d+) bytes.*copied, ([\d.]+) s", done.stderr)
        if done.returncode == 0 and match:
            results[flag] = int(match.group(1)) / 2**20 / float(match.group(2))
        else:
            results[flag] = float("nan")
    return results


def throughput_rounds(workdir: Path, steps: int, rounds: int) -> dict:
    """The writer and ``dd`` alternately, ``rounds`` times: on a shared machine the disk's speed drifts by 2x within
    a minute, so each round's ratio compares neighbours, and the figure is the median ratio."""
    writers, dds = [], []
    for _ in range(rounds):
        writers.append(writer_throughput(workdir, steps))
        dds.append(dd_throughput(workdir, round(writers[-1]["per_step_mib"] * steps)))
    ratios = [w["mib_s"] / d["oflag=direct"] for w, d in zip(writers, dds, strict=True)]
    return {
        "writer": {**writers[0], "mib_s": statistics.median(w["mib_s"] for w in writers)},
        "dd": {k: statistics.median(d[k] for d in dds) for k in dds[0]},
        "ratio": statistics.median(ratios),
        "rounds": [(w["mib_s"], d["oflag=direct"]) for w, d in zip(writers, dds, strict=True)],
    }


def print_throughput(t: dict) -> None:
    writer, dd = t["writer"], t["dd"]
    print(f"writer throughput: {writer['mib_s']:.0f} MiB/s ({writer['steps']} steps of {writer['per_step_mib']:.1f} "
          f"MiB, fsynced, end to end); dd writing as many bytes: oflag=direct {dd['oflag=direct']:.0f} MiB/s, "
          f"conv=fdatasync {dd['conv=fdatasync']:.0f} MiB/s (medians of {len(t['rounds'])} alternating rounds) "
          f"-> writer / dd(direct) = {t['ratio']:.2f} (median of the rounds' ratios)  [target >= 0.6]")  # fmt: skip
    print("  rounds (writer, dd direct MiB/s): " + ", ".join(f"({w:.0f}, {d:.0f})" for w, d in t["rounds"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="Where recordings are written (default: a temp dir in /tmp).")
    parser.add_argument("--pairs", type=int, default=3, help="Paired with/without runs (ABBA order).")
    parser.add_argument("--timed-steps", type=int, default=3, help="Timed steps per speed run (after 1 warm-up).")
    parser.add_argument("--batch", type=int, default=32, help="Blocks of 128 tokens per step for the speed runs.")
    parser.add_argument("--rss-steps", type=int, default=100)
    parser.add_argument(
        "--rss-batch", type=int, default=1, help="Batch of the RSS run (recorder memory is batch-free)."
    )
    parser.add_argument(
        "--throughput-steps",
        type=int,
        default=100,
        help="Steps the writer writes per round, end to end (the notebook records 100); dd writes as many bytes.",
    )
    parser.add_argument("--throughput-rounds", type=int, default=3, help="Alternating writer / dd rounds.")
    parser.add_argument(
        "--simulated-step-ms", type=float, default=140.0, help="Step time of the simulated-step figure."
    )
    parser.add_argument(
        "--writer-only",
        action="store_true",
        help="Only the writer's figures: throughput against dd, and the simulated-step share.",
    )
    parser.add_argument("--rss-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rss-without-recorder", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="wakelab-recorder-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    if args.rss_only:
        print(json.dumps(rss_run(workdir, args.rss_steps, args.rss_batch, record=not args.rss_without_recorder)))
        return

    if args.writer_only:
        throughput = throughput_rounds(workdir, args.throughput_steps, args.throughput_rounds)
        sims = {lend: simulated_step_share(workdir, 45, args.simulated_step_ms / 1000, lend) for lend in (False, True)}
        print_throughput(throughput)
        for lend, sim in sims.items():
            how = "lent to the writer (now)" if lend else "copied in the hook (before)"
            print(f"simulated {args.simulated_step_ms:.0f} ms step, every field of all {VOCAB} rows, {how}: hooks "
                  f"{sim['mean_ms']:.2f} ms mean ({sim['median_ms']:.2f} median) over {sim['steps']} steps = "
                  f"{100 * sim['share']:.2f} % of the step  [target <= 2 %]")  # fmt: skip
        print(f"  lent / copied hook time: {sims[True]['mean_ms'] / sims[False]['mean_ms']:.3f}")
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        return

    started = time.monotonic()
    print(f"recorder overhead on the Wordybird shape: vocab {VOCAB}, d {N_EMBD}, {LAYERS} layers, bf16, full, "
          f"all rows, all fields; torch threads {torch.get_num_threads()}; recordings in {workdir}",
          flush=True)  # fmt: skip

    print(f"\n[1/3] peak RSS, fresh processes with and without the recorder, {args.rss_steps} steps at batch "
          f"{args.rss_batch} x {SEQ}", flush=True)  # fmt: skip
    series = {}
    for record in (True, False):
        child = subprocess.run(
            [sys.executable, __file__, "--rss-only", "--dir", str(workdir), "--rss-steps", str(args.rss_steps),
             "--rss-batch", str(args.rss_batch), *([] if record else ["--rss-without-recorder"])],
            capture_output=True, text=True,
        )  # fmt: skip
        if child.returncode != 0:
            print(child.stderr[-3000:])
            raise SystemExit("the RSS run failed")
        series[record] = json.loads(child.stdout.strip().splitlines()[-1])
    rss = series[True]
    mem = {int(k): v for k, v in rss["memory"].items()}
    base = {int(k): v for k, v in series[False]["memory"].items()}

    print(f"\n[2/3] {args.pairs} paired runs at batch {args.batch} x {SEQ}: 1 warm-up + {args.timed_steps} timed steps",
          flush=True)  # fmt: skip
    speed = speed_pairs(workdir, args.pairs, args.timed_steps, args.batch)

    print("\n[3/3] write throughput", flush=True)
    throughput = throughput_rounds(workdir, args.throughput_steps, args.throughput_rounds)
    writer = throughput["writer"]

    step_with = statistics.median(speed["step_s"]["with"])
    hook_ms = statistics.median(speed["hook_ms"])
    print("\n=== results ===")
    print(f"recorder share of step time (time inside its hooks, batch {args.batch}): median "
          f"{100 * statistics.median(speed['shares']):.2f} %  (per run: "
          f"{', '.join(f'{100 * s:.2f}' for s in speed['shares'])})  [target <= 2 %]")  # fmt: skip
    print(f"  recorder hook {hook_ms:.1f} ms/step vs step {step_with:.2f} s; final flush at run end "
          f"{statistics.median(speed['close_s']):.2f} s (once per run, not in the step figures)")  # fmt: skip
    print(f"  stress case batch {args.rss_batch}: hook {rss['hook_ms']:.1f} ms/step (max {rss['max_hook_ms']:.1f}) "
          f"vs step {rss['step_s']:.3f} s -> {100 * rss['hook_ms'] / 1000 / rss['step_s']:.1f} %")  # fmt: skip
    print(f"steps/s with / without recorder: median {statistics.median(speed['ratios']):.3f}  (pairs: "
          f"{', '.join(f'{r:.3f}' for r in speed['ratios'])})  [target >= 0.95]")  # fmt: skip
    print(f"  s/step with: {', '.join(f'{s:.2f}' for s in speed['step_s']['with'])}; "
          f"without: {', '.join(f'{s:.2f}' for s in speed['step_s']['without'])}")  # fmt: skip
    last = rss["steps"]
    if 10 in mem and last in mem:
        peak = {k: v["peak_rss_mib"] for k, v in sorted(mem.items())}
        print(f"peak RSS after {last} recorded steps / after 10: {peak[last] / peak[10]:.3f}  "
              f"({peak[10]:.0f} -> {peak[last]:.0f} MiB)  [target <= 1.05]")  # fmt: skip
        if 20 in peak:
            print(f"  after {last} / after 20 (once the first shard has cycled): {peak[last] / peak[20]:.3f}")
        print("  peak RSS every 10 steps: " + ", ".join(f"{v:.0f}" for v in peak.values()) + " MiB")
        if 10 in base and last in base:
            print(f"  without the recorder: {base[last]['peak_rss_mib'] / base[10]['peak_rss_mib']:.3f} "
                  f"({base[10]['peak_rss_mib']:.0f} -> {base[last]['peak_rss_mib']:.0f} MiB); the recorder adds "
                  f"{peak[last] - base[last]['peak_rss_mib']:.0f} MiB at step {last}")  # fmt: skip
        w = rss.get("writer", {})
        print(f"  writer held at most {w.get('max_held_steps')} steps (steps_per_shard 10 + 1 being copied; "
              f"queue peak {w.get('max_queued')}); recording {rss['bytes'] / 2**20:.0f} MiB on disk")  # fmt: skip
    need = writer["per_step_mib"] / step_with
    print_throughput(throughput)
    print(f"  training at batch {args.batch} needs {need:.1f} MiB/s ({writer['per_step_mib']:.1f} MiB per "
          f"{step_with:.2f} s step); at batch {args.rss_batch}: "
          f"{writer['per_step_mib'] / rss['step_s']:.0f} MiB/s")  # fmt: skip
    print(f"total benchmark time {time.monotonic() - started:.0f} s")
    if args.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
