"""P1 at Llama-3.2-1B's width: `tokens` with the chunked loss against `tokens` as before, `mask`, PEFT TrainableTokens.

P1 adds 44,195 new rows to Llama-3.2-1B's 128,256. Here a Llama is built from a ``LlamaConfig`` of that width
(hidden 2048, MLP 8192, 32 heads / 8 KV heads, tied embeddings, ``vocab_size = 172,451``) with 2 layers, fp32 on
CPU; random token ids (10% new ids) are inputs and labels; seq_len 512, batch 1. Four ways to train only the new rows:

- ``tokens+chunked``: ``setup_trainable_rows(strategy="tokens")`` + ``WakelabTrainer`` with the chunked loss
  (``train.loss_chunk_tokens``, default 256): what ``wakelab run`` does now;
- ``tokens``: the same with ``loss_chunk_tokens=None``: transformers' loss over the concatenated full logits (before);
- ``mask``: the P1 notebook's way (whole matrix trains, the ``mask`` plugin zeroes base-row gradients), full logits;
- ``peft``: PEFT's ``TrainableTokensConfig(token_indices=new ids)`` on ``embed_tokens`` (PEFT ties the lm_head to
  it) and a plain ``transformers.Trainer``: what a user of the ``peft`` dependency would pick. It rebuilds the full
  ``vocab x d`` matrix with ``index_copy`` on every forward, for the embedding and again for the tied head.

Optimizer: AdamW at lr 5e-3; the three wakelab variants use ``train.optimizer``'s default (what ``wakelab run``
uses), ``peft`` Trainer's default ``optim``; the header prints both.

Each variant runs in its own subprocess, one after the other (the four at once would not fit in this machine's
memory), so its memory figures are its own: Adam ``exp_avg`` + ``exp_avg_sq`` bytes after training; peak RSS over
the process's life (``ru_maxrss``, the one judged) and over the training window alone (the kernel's high-water mark,
reset right before ``trainer.train()``); steps/s over the steps after the warm-up ones. Rounds alternate the order;
figures are medians over rounds. Targets: ``tokens+chunked`` peak RSS <= 0.6x that of ``mask`` and of ``peft``,
and steps/s >= theirs. Speed on a shared 2-core machine swings; read the speed ratios with the per-round figures.

``--wakelab-run`` also re-measures the issue's ``wakelab run`` figure: a Llama built from ``model.architecture``
(d = 256, 2 layers), the offline 50,257-token BPE plus 44,195 coined words, ``train.trainable=tokens``, batch 4 x
512 tokens, 3 steps, run as a subprocess with ``train.loss_chunk_tokens=null`` (before) and with the default;
peak RSS of each process (``wait4``). Target: <= 0.6x. The offline BPE is cached under ``--cache`` (built once).

Run:  python benchmarks/full_width.py [--rounds 1] [--steps 3] [--warmup 1] [--wakelab-run]
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

from p1_shape import (
    NUM_BASE,
    NUM_NEW,
    adam_state,
    proc_status_kib,
    quiet_bridge,
    random_blocks,
    reset_peak_rss,
    wide_inputs,
)

VARIANTS = ("tokens+chunked", "tokens", "mask", "peft")
TARGET_RSS = 0.6
TARGET_SPEED = 1.0
MiB = 1024 * 1024


def worker(variant: str, args, scratch: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from wakelab.config import TrainConfig
    from wakelab.data.corpus import collate

    config = LlamaConfig(
        vocab_size=NUM_BASE + NUM_NEW,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=max(2048, args.seq_len),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    rss_model = proc_status_kib("VmRSS")

    steps = args.warmup + args.steps
    _, dataset = random_blocks(steps * args.batch, args.seq_len, 0.10)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.durations: list[float] = []
            self._start = 0.0

        def on_step_begin(self, a, state, control, **kw):
            self._start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.durations.append(time.perf_counter() - self._start)

    targs = TrainingArguments(
        output_dir=os.path.join(scratch, "out"),
        report_to="none",
        use_cpu=True,
        max_steps=steps,
        per_device_train_batch_size=args.batch,
        learning_rate=5e-3,
        # wakelab's variants: the AdamW implementation `wakelab run` uses (train.optimizer's default); PEFT:
        # Trainer's own default, what its users get.
        **({} if variant == "peft" else {"optim": TrainConfig.model_fields["optimizer"].default}),
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=42,
    )
    timer = StepTimer()
    if variant == "peft":
        from peft import TrainableTokensConfig, get_peft_model

        model = get_peft_model(
            model,
            TrainableTokensConfig(
                target_modules=["embed_tokens"], token_indices=list(range(NUM_BASE, NUM_BASE + NUM_NEW))
            ),
        )
        trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collate, callbacks=[timer])
    else:
        from wakelab.hooks.registry import build_manager
        from wakelab.rows import setup_trainable_rows
        from wakelab.run.trainer import WakelabTrainer

        strategy = "mask" if variant == "mask" else "tokens"
        rows = setup_trainable_rows(model, num_base=NUM_BASE, strategy=strategy)
        bridge = quiet_bridge(lambda: trainer, targs.output_dir)
        trainer = WakelabTrainer(
            model=model,
            args=targs,
            train_dataset=dataset,
            data_collator=collate,
            callbacks=[bridge, timer],
            rows=rows,
            pm=build_manager(["mask"] if strategy == "mask" else []),
            loss_chunk_tokens=args.chunk if variant == "tokens+chunked" else None,
        )
    trainer.remove_callback(PrinterCallback)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    gc.collect()
    gc.freeze()
    rss_before = proc_status_kib("VmRSS")
    maxrss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_reset = reset_peak_rss()
    trainer.train()
    hwm_train = proc_status_kib("VmHWM")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    state_bytes, _ = adam_state(trainer)
    timed = timer.durations[args.warmup :]
    return {
        "variant": variant,
        "trainable": trainable,
        "opt_state_bytes": state_bytes,
        "rss_model_kib": rss_model,
        "rss_before_train_kib": rss_before,
        "maxrss_setup_kib": maxrss_setup,
        "peak_train_kib": hwm_train if hwm_reset else None,
        "maxrss_kib": maxrss,
        "steps_per_s": len(timed) / sum(timed),
        "step_s": timed,
        "threads": torch.get_num_threads(),
        "optim": str(getattr(targs.optim, "value", targs.optim)),
    }


def run_worker(variant: str, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    sys.stderr.write(proc.stderr[-4000:])
    raise SystemExit(f"worker {variant} exited with {proc.returncode} and no result")


# ---------------------------------------------------------------------------------------------------------------
# the issue's `wakelab run` measurement
# ---------------------------------------------------------------------------------------------------------------
def measure_wakelab_run(args) -> None:
    folder = tempfile.mkdtemp(prefix="wakelab-fullwidth-run-")
    try:
        lexicon, corpus, _ = wide_inputs(folder)
        figures = {}
        for label, chunk in (("before (loss_chunk_tokens=null)", "null"), ("now (chunked, default)", None)):
            out = os.path.join(folder, f"out-{chunk}")
            sets = {
                "model.architecture": json.dumps(
                    {
                        "model_type": "llama",
                        "hidden_size": 256,
                        "intermediate_size": 512,
                        "num_hidden_layers": 2,
                        "num_attention_heads": 4,
                        "num_key_value_heads": 2,
                        "max_position_embeddings": 1024,
                        "tie_word_embeddings": True,
                    }
                ),
                "model.tokenizer": "offline-bpe",
                "vocab.lexicon": lexicon,
                "data.corpus": corpus,
                "data.seq_len": 512,
                "train.batch_size": 4,
                "train.max_steps": 3,
                "train.trainable": "tokens",
                "output_dir": out,
                "tracking.log_tokenizer": "false",
            }
            if chunk is not None:
                sets["train.loss_chunk_tokens"] = chunk
            cmd = [sys.executable, "-m", "wakelab", "run", "--no-progress"]
            for key, value in sets.items():
                cmd += ["--set", f"{key}={value}"]
            env = dict(os.environ, WAKELAB_CACHE=args.cache, MLFLOW_TRACKING_URI=f"sqlite:///{folder}/mlflow.db")
            started = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            output = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                sys.stderr.write(output[-3000:])
                raise SystemExit(f"wakelab run ({label}) failed")
            figures[label] = usage.ru_maxrss
            print(
                f"wakelab run, {label}: peak RSS {usage.ru_maxrss / 1024:.0f} MiB ({time.monotonic() - started:.0f} s)",
                flush=True,
            )
        before, now = figures.values()
        ratio = now / before
        print(
            f"wakelab run batch 4 x 512 peak RSS now/before = {ratio:.3f} (target <= {TARGET_RSS}) "
            f"{'PASS' if ratio <= TARGET_RSS else 'FAIL'}"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="runs of each variant, order alternating")
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps before them")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=256, help="loss_chunk_tokens of tokens+chunked")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--wakelab-run", action="store_true", help="also re-measure the issue's `wakelab run` figure")
    parser.add_argument("--only-wakelab-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--cache",
        default=os.path.expanduser("~/.cache/wakelab-bench"),
        help="WAKELAB_CACHE for --wakelab-run (the offline BPE is built there once)",
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        scratch = tempfile.mkdtemp(prefix="wakelab-fullwidth-")
        os.environ.setdefault("WAKELAB_CACHE", scratch)
        try:
            result = worker(args.worker, args, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import torch
    import transformers

    print(
        f"full_width: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    if not args.only_wakelab_run:
        variants = [v for v in args.variants.split(",") if v]
        argv = [
            f"--steps={args.steps}",
            f"--warmup={args.warmup}",
            f"--hidden={args.hidden}",
            f"--layers={args.layers}",
            f"--seq-len={args.seq_len}",
            f"--batch={args.batch}",
            f"--chunk={args.chunk}",
        ]
        print(
            f"vocab {NUM_BASE:,} base + {NUM_NEW:,} new = {NUM_BASE + NUM_NEW:,} rows, d={args.hidden}, "
            f"{args.layers} layers, tied, fp32; seq_len={args.seq_len} batch={args.batch}; {args.warmup} warm-up + "
            f"{args.steps} measured steps; {args.rounds} round(s); chunk {args.chunk} tokens",
            flush=True,
        )
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                started = time.monotonic()
                got = run_worker(variant, argv)
                results[variant].append(got)
                print(
                    f"round {r + 1} {variant:15s} peak RSS {got['maxrss_kib'] / 1024:8.0f} MiB, "
                    f"{got['steps_per_s']:.3f} steps/s (steps {', '.join(f'{s:.1f}' for s in got['step_s'])} s; "
                    f"{time.monotonic() - started:.0f} s in all; optim {got['optim']})",
                    flush=True,
                )

        def med(variant: str, key: str):
            values = [r[key] for r in results[variant] if r[key] is not None]
            return statistics.median(values) if values else None

        print()
        header = (
            f"{'variant':15s} {'trainable':>11s} {'Adam MiB':>9s} {'setup peak':>10s} {'RSS@train MiB':>13s} "
            f"{'train peak MiB':>14s} {'peak RSS MiB':>12s} {'steps/s':>8s} {'s/step':>7s}"
        )
        print(header)
        print("-" * len(header))
        for v in variants:
            peak_train = med(v, "peak_train_kib")
            print(
                f"{v:15s} {results[v][0]['trainable']:>11,d} {med(v, 'opt_state_bytes') / MiB:9.1f} "
                f"{med(v, 'maxrss_setup_kib') / 1024:10.0f} "
                f"{med(v, 'rss_before_train_kib') / 1024:13.0f} "
                f"{(peak_train or 0) / 1024:14.0f} {med(v, 'maxrss_kib') / 1024:12.0f} "
                f"{med(v, 'steps_per_s'):8.3f} {1 / med(v, 'steps_per_s'):7.1f}"
            )
        print(
            "(MiB, medians over rounds; setup peak: ru_maxrss right before training (model build, row split); "
            "RSS@train: RSS then; train peak: high-water mark during training; peak RSS: the process's ru_maxrss, "
            "judged)"
        )
        print()
        if "tokens+chunked" in variants:
            for peer in ("mask", "peft", "tokens"):
                if peer not in variants:
                    continue
                rss = med("tokens+chunked", "maxrss_kib") / med(peer, "maxrss_kib")
                window = med("tokens+chunked", "peak_train_kib") / med(peer, "peak_train_kib")
                speed = med("tokens+chunked", "steps_per_s") / med(peer, "steps_per_s")
                state = med("tokens+chunked", "opt_state_bytes") / med(peer, "opt_state_bytes")
                judged = peer != "tokens"
                print(
                    f"tokens+chunked / {peer:6s}: peak RSS {rss:.3f}"
                    + (f" (target <= {TARGET_RSS}) {'PASS' if rss <= TARGET_RSS else 'FAIL'}" if judged else "")
                    + f" [training window {window:.3f}]; steps/s {speed:.3f}"
                    + (f" (target >= {TARGET_SPEED}) {'PASS' if speed >= TARGET_SPEED else 'FAIL'}" if judged else "")
                    + f"; optimizer state {state:.3f}"
                )
    if args.wakelab_run or args.only_wakelab_run:
        print()
        measure_wakelab_run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
