"""`tokens` vs `mask` trainable-rows strategies at P1's proportions: optimizer state, peak RSS and steps/s.

P1 adds 44,195 new rows to a 128,256-row vocabulary. Here a tiny Llama (2 layers, hidden 256, tied embeddings) is
built straight from a ``LlamaConfig`` with ``vocab_size = 128,256 + 44,195``; random token ids (10% of them new
ids) are the inputs and labels. Rows come from ``setup_trainable_rows(model, num_base=128256, strategy=...)`` and
training is ``WakelabTrainer`` + ``HookBridge`` as the engine wires them (the ``mask`` plugin active for ``mask``).

Each strategy runs in its own subprocess, so its memory figures are its own:

- optimizer state: bytes of every Adam ``exp_avg`` + ``exp_avg_sq`` tensor after training;
- RSS before training (after model, rows, Trainer and data are built), the peak RSS during training (the kernel's
  high-water mark, reset right before ``trainer.train()`` through ``/proc/self/clear_refs``) and the process's
  lifetime peak (``ru_maxrss``), which is the one judged;
- steps/s over the steps after a few warm-up steps.

Speed on this shared 2-core machine swings by several times within seconds, so the two processes of a repeat
live side by side and step in lock step: the driver lets one of them do one optimizer step, then the other
(tokens step 1, mask step 1, tokens step 2, ...), while the idle one blocks on a pipe. A step is timed inside its
process from the driver's go to its ``on_step_end``. Repeats alternate which strategy steps first, and the speed
figure judged is the median over repeats of (tokens steps/s) / (mask steps/s). Sanity checks: under ``mask`` the
base rows must stay bit-identical, under both the new rows must move.

Run:  python benchmarks/tokens_vs_mask.py [--pairs 3] [--steps 8] [--warmup 3]
Targets: tokens optimizer state <= 0.3x mask's; tokens peak RSS <= mask's; tokens steps/s >= 0.97x mask's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from p1_shape import NUM_BASE, NUM_NEW, adam_state, proc_status_kib, quiet_bridge, random_blocks, reset_peak_rss

TARGET_STATE = 0.3
TARGET_RSS = 1.0
TARGET_SPEED = 0.97
MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------------------------------
# worker: one strategy, one process
# ---------------------------------------------------------------------------------------------------------------
def worker(strategy: str, args, scratch: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from wakelab.data.corpus import collate
    from wakelab.hooks.registry import build_manager
    from wakelab.rows import setup_trainable_rows
    from wakelab.run.trainer import WakelabTrainer

    rss_start = proc_status_kib("VmRSS")
    config = LlamaConfig(
        vocab_size=NUM_BASE + NUM_NEW,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(256, args.seq_len),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    rss_model = proc_status_kib("VmRSS")
    rows = setup_trainable_rows(model, num_base=NUM_BASE, strategy=strategy)
    pm = build_manager(["mask"] if strategy == "mask" else [])

    steps = args.warmup + args.steps
    ids, dataset = random_blocks(steps * args.batch, args.seq_len, args.new_share)

    # Sanity probes (small): base rows that the data uses must not move under mask; new rows must move.
    used = ids.unique()
    base_probe = used[used < NUM_BASE][:2000]
    new_probe = used[used >= NUM_BASE][:2000]
    base_before = rows.values(base_probe).clone()
    new_before = rows.values(new_probe).clone()

    class StepTimer(TrainerCallback):
        """Times each optimizer step; in lock step it waits for the driver's go before each step.

        A step is timed from the go (or the previous step's end) to this step's ``on_step_end``.
        """

        def __init__(self):
            self.durations: list[float] = []
            self._start = 0.0

        def _wait_for_go(self):
            if args.lockstep:
                print("@@WAIT", flush=True)
                if sys.stdin.readline().strip() != "GO":
                    raise SystemExit("driver went away")
            self._start = time.perf_counter()

        def on_train_begin(self, a, state, control, **kw):
            self._wait_for_go()

        def on_step_end(self, a, state, control, **kw):
            self.durations.append(time.perf_counter() - self._start)
            self._wait_for_go()

    out_dir = os.path.join(scratch, "out")
    targs = TrainingArguments(
        output_dir=out_dir,
        report_to="none",
        use_cpu=True,
        max_steps=steps,
        per_device_train_batch_size=args.batch,
        learning_rate=5e-3,
        optim="adamw_torch",
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=42,
    )
    timer = StepTimer()
    trainer: WakelabTrainer
    bridge = quiet_bridge(lambda: trainer, out_dir)
    trainer = WakelabTrainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        data_collator=collate,
        callbacks=[bridge, timer],
        rows=rows,
        pm=pm,
    )
    trainer.remove_callback(PrinterCallback)

    gc.collect()
    gc.freeze()  # full collections over the import-time heap would add random pauses to the timed steps
    rss_before = proc_status_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_reset = reset_peak_rss()
    trainer.train()
    hwm_train = proc_status_kib("VmHWM")
    maxrss_end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    rss_after = proc_status_kib("VmRSS")

    state_bytes, state_params = adam_state(trainer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    timed = timer.durations[args.warmup :]
    steps_per_s = len(timed) / sum(timed)
    step_ms = [d * 1000 for d in timed]
    return {
        "strategy": strategy,
        "trainable_params": trainable,
        "state_tensors": state_params,
        "opt_state_bytes": state_bytes,
        "rss_start_kib": rss_start,
        "rss_model_kib": rss_model,
        "rss_before_train_kib": rss_before,
        "maxrss_before_train_kib": maxrss_before,
        "peak_train_kib": hwm_train if hwm_reset else None,
        "maxrss_kib": maxrss_end,
        "rss_after_kib": rss_after,
        "steps_per_s": steps_per_s,
        "median_step_ms": statistics.median(step_ms),
        "step_ms": step_ms,
        "steps": trainer.state.global_step,
        "base_rows_unchanged": bool(torch.equal(rows.values(base_probe), base_before)),
        "new_rows_moved": bool(not torch.equal(rows.values(new_probe), new_before)),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------------------
# driver: alternate strategies, one subprocess each
# ---------------------------------------------------------------------------------------------------------------
def run_pair(order: tuple[str, str], argv: list[str]) -> dict[str, dict]:
    """Both strategies, each in its own process, stepping in lock step: order[0]'s step 1, order[1]'s step 1, ..."""
    procs = {}
    logs = {}
    for strategy in order:
        logs[strategy] = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", strategy, "--lockstep", *argv]
        procs[strategy] = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[strategy], text=True, bufsize=1
        )
    results: dict[str, dict] = {}

    def fail(strategy: str, what: str):
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        logs[strategy].seek(0)
        sys.stderr.write(logs[strategy].read()[-4000:])
        raise SystemExit(f"worker {strategy}: {what}")

    def next_message(strategy: str) -> str:
        """Read the worker's stdout up to its next protocol line: @@WAIT, or RESULT at the end."""
        proc = procs[strategy]
        while True:
            line = proc.stdout.readline()
            if not line:
                fail(strategy, f"exited (code {proc.wait()})")
            if line.startswith("RESULT "):
                results[strategy] = json.loads(line[len("RESULT ") :])
                return "RESULT"
            if line.startswith("@@WAIT"):
                return "WAIT"

    waiting = {s: next_message(s) == "WAIT" for s in order}  # both built and at on_train_begin
    while any(waiting.values()):
        for strategy in order:
            if waiting[strategy]:
                procs[strategy].stdin.write("GO\n")
                procs[strategy].stdin.flush()
                waiting[strategy] = next_message(strategy) == "WAIT"
    for strategy in order:
        if procs[strategy].wait() != 0 or strategy not in results:
            fail(strategy, f"exited (code {procs[strategy].returncode}) without a result")
        logs[strategy].close()
    return results


def mib(kib: float | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:8.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="tokens/mask pairs, order alternating (>= 3)")
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before them")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-share", type=float, default=0.10, help="share of input positions holding new ids")
    parser.add_argument("--worker", choices=("tokens", "mask"), help=argparse.SUPPRESS)
    parser.add_argument("--lockstep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        scratch = tempfile.mkdtemp(prefix=f"wakelab-{args.worker}-")
        os.environ.setdefault("WAKELAB_CACHE", scratch)
        try:
            result = worker(args.worker, args, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import torch
    import transformers

    argv = [
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--hidden={args.hidden}",
        f"--layers={args.layers}",
        f"--seq-len={args.seq_len}",
        f"--batch={args.batch}",
        f"--new-share={args.new_share}",
    ]
    print(
        f"tokens_vs_mask: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus"
    )
    print(
        f"vocab {NUM_BASE:,} base + {NUM_NEW:,} new = {NUM_BASE + NUM_NEW:,} rows, d={args.hidden}, "
        f"{args.layers} layers, tied; seq_len={args.seq_len} batch={args.batch}, {args.new_share:.0%} new ids; "
        f"{args.warmup} warm-up + {args.steps} measured steps; {args.pairs} pairs"
    )
    results: dict[str, list[dict]] = {"tokens": [], "mask": []}
    ratios = []
    for pair in range(1, args.pairs + 1):
        order = ("tokens", "mask") if pair % 2 else ("mask", "tokens")
        got = run_pair(order, argv)
        for s in order:
            results[s].append(got[s])
        ratio = got["tokens"]["steps_per_s"] / got["mask"]["steps_per_s"]
        ratios.append(ratio)
        step_ratio = statistics.median(
            m / t for t, m in zip(got["tokens"]["step_ms"], got["mask"]["step_ms"], strict=True)
        )
        print(
            f"pair {pair}: {order[0]:>6s} first  tokens {got['tokens']['steps_per_s']:.3f} steps/s "
            f"({got['tokens']['median_step_ms']:.0f} ms median) | mask {got['mask']['steps_per_s']:.3f} steps/s "
            f"({got['mask']['median_step_ms']:.0f} ms median) | ratio {ratio:.3f} (median step-pair ratio "
            f"{step_ratio:.3f})",
            flush=True,
        )

    def med(strategy: str, key: str):
        values = [r[key] for r in results[strategy] if r[key] is not None]
        return statistics.median(values) if values else None

    print()
    header = (
        f"{'strategy':8s} {'trainable':>11s} {'Adam state MiB':>14s} {'RSS@model MiB':>13s} "
        f"{'RSS@train MiB':>13s} {'train peak MiB':>14s} {'+during train':>13s} {'peak RSS MiB':>12s} "
        f"{'steps/s':>8s} {'step ms':>8s}"
    )
    print(header)
    print("-" * len(header))
    for s in ("tokens", "mask"):
        before, peak_train = med(s, "rss_before_train_kib"), med(s, "peak_train_kib")
        rise = None if peak_train is None else peak_train - before
        print(
            f"{s:8s} {results[s][0]['trainable_params']:>11,d} {med(s, 'opt_state_bytes') / MiB:14.1f} "
            f"{mib(med(s, 'rss_model_kib')):>13s} {mib(before):>13s} {mib(peak_train):>14s} {mib(rise):>13s} "
            f"{mib(med(s, 'maxrss_kib')):>12s} {med(s, 'steps_per_s'):8.3f} {med(s, 'median_step_ms'):8.0f}"
        )
    print(
        "(medians over the runs; RSS@train: right before trainer.train(); train peak: high-water mark during "
        "training; peak RSS: the process's ru_maxrss)"
    )
    checks = []
    for s in ("tokens", "mask"):
        moved = all(r["new_rows_moved"] for r in results[s])
        kept = all(r["base_rows_unchanged"] for r in results[s])
        checks.append(f"{s}: new rows moved={moved}, base rows bit-identical={kept}")
    print("sanity: " + "; ".join(checks))

    state_ratio = med("tokens", "opt_state_bytes") / med("mask", "opt_state_bytes")
    rss_ratio = med("tokens", "maxrss_kib") / med("mask", "maxrss_kib")
    speed_ratio = statistics.median(ratios)
    train_peak_t, train_peak_m = med("tokens", "peak_train_kib"), med("mask", "peak_train_kib")
    print()
    print(
        f"optimizer state tokens/mask = {state_ratio:.3f} (target <= {TARGET_STATE}) "
        f"{'PASS' if state_ratio <= TARGET_STATE else 'FAIL'}"
    )
    print(
        f"peak RSS        tokens/mask = {rss_ratio:.3f} (target <= {TARGET_RSS}) "
        f"{'PASS' if rss_ratio <= TARGET_RSS else 'FAIL'}"
        + (f"  [training-window peak ratio {train_peak_t / train_peak_m:.3f}]" if train_peak_t and train_peak_m else "")
    )
    print(
        f"steps/s         tokens/mask = {speed_ratio:.3f} (target >= {TARGET_SPEED}) "
        f"{'PASS' if speed_ratio >= TARGET_SPEED else 'FAIL'}  [paired ratios: "
        f"{', '.join(f'{r:.3f}' for r in ratios)}]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
