"""The GPU figures, ready for when a device is lent: P1 at real depth and Wordybird with every field recorded.

Run by ``benchmarks/gpu_check.sh`` (which adds the CUDA-only tests); ``--tiny`` runs the same code paths on the CPU at
toy sizes in about a minute, so CI keeps this script correct on a machine without a GPU.

1. **P1 at real depth.** A Llama with Llama-3.2-1B's depth and widths (16 layers, hidden 2048, MLP 8192, 32 heads /
   8 KV heads, tied), random weights, ``vocab = 128,256 + 44,195``, loaded in bf16 and in 4-bit nf4 (bf16 compute);
   random token ids (10% new ids), seq 512, batch 1. Three ways to train only the new rows: ``tokens``
   (``setup_trainable_rows`` + ``WakelabTrainer``, the chunked loss: what ``wakelab run`` does), ``mask`` (the P1
   notebook's: whole matrix trainable, base-row gradients zeroed) and PEFT's ``TrainableTokens`` on a plain
   ``Trainer``. Each in its own process: tokens/s after a warm-up step, and peak GPU memory
   (``torch.cuda.max_memory_allocated``; on the CPU, with ``--tiny``, the peak RSS instead). Target: ``tokens``
   <= 0.5x the memory of ``mask``, in each precision.
2. **Wordybird, every field recorded.** ``wakelab run --preset wordybird`` (GPT-2 tiny, bf16, batch 32 x 128, the
   recorder on every row with embeddings, grads, both Adam moments, logits, loss and lr at every step): steps/s
   after the first step, against the notebook's 7.1 on its accelerator. Target >= 5x (35.5 steps/s), or bounded by
   the disk: the bytes recorded per step and the disk's write rate (``dd`` with fsync into the same folder) give
   the disk-bound rate, printed beside it. Without GCIDE (``apt-get install dict-gcide``) the corpus is the demo's.

Run:  python benchmarks/gpu_check.py [--tiny] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from p1_shape import NUM_BASE, NUM_NEW, random_blocks

NOTEBOOK_STEPS_PER_S = 7.1
TARGET_SPEEDUP = 5.0
TARGET_MEMORY = 0.5
VARIANTS = ("tokens", "mask", "peft")
PRECISIONS = ("bf16", "nf4")
PROBE_PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_probe_plugin.py")


def sizes(tiny: bool) -> dict:
    if tiny:
        return {"base": 1000, "new": 200, "hidden": 64, "inner": 128, "layers": 2, "heads": 4, "kv": 2, "seq": 64}
    return {"base": NUM_BASE, "new": NUM_NEW, "hidden": 2048, "inner": 8192, "layers": 16, "heads": 32, "kv": 8,
            "seq": 512}  # fmt: skip


def base_folder(cache: str, s: dict) -> str:
    """Random weights of the P1 shape, saved once in bf16 (nf4 quantizes them on load)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = os.path.join(cache, f"p1-random-{s['layers']}x{s['hidden']}-{s['base'] + s['new']}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    config = LlamaConfig(
        vocab_size=s["base"] + s["new"],
        hidden_size=s["hidden"],
        intermediate_size=s["inner"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        head_dim=s["hidden"] // s["heads"],
        max_position_embeddings=max(1024, s["seq"]),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = folder + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def p1_worker(variant: str, precision: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from wakelab.data.corpus import collate

    s = sizes(args.tiny)
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    kwargs: dict = {"dtype": torch.bfloat16, "device_map": {"": device}}
    if precision == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    model = AutoModelForCausalLM.from_pretrained(base_folder(args.cache, s), **kwargs)
    if precision == "nf4":
        from wakelab.quantized import keep_training_path

        keep_training_path(model)
    import p1_shape

    p1_shape.NUM_BASE, p1_shape.NUM_NEW = s["base"], s["new"]
    steps = 1 + args.steps
    _, dataset = random_blocks(steps, s["seq"], 0.10)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.durations: list[float] = []

        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.durations.append(time.perf_counter() - self._start)

    targs = TrainingArguments(
        output_dir=os.path.join(args.scratch, f"out-{variant}-{precision}"),
        report_to="none",
        use_cpu=not cuda,
        max_steps=steps,
        per_device_train_batch_size=1,
        learning_rate=5e-3,
        bf16=True,
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=42,
    )
    timer = StepTimer()
    new_ids = list(range(s["base"], s["base"] + s["new"]))
    if variant == "peft":
        from peft import TrainableTokensConfig, get_peft_model

        model = get_peft_model(model, TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=new_ids))
        trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collate, callbacks=[timer])
    else:
        from p1_shape import quiet_bridge

        from wakelab.hooks.registry import build_manager
        from wakelab.rows import setup_trainable_rows
        from wakelab.run.trainer import WakelabTrainer

        rows = setup_trainable_rows(model, num_base=s["base"], strategy=variant)
        bridge = quiet_bridge(lambda: trainer, targs.output_dir)
        trainer = WakelabTrainer(
            model=model,
            args=targs,
            train_dataset=dataset,
            data_collator=collate,
            callbacks=[bridge, timer],
            rows=rows,
            pm=build_manager(["mask"] if variant == "mask" else []),
            loss_chunk_tokens=256 if variant == "tokens" else None,
        )
    trainer.remove_callback(PrinterCallback)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = timer.durations[1:]
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        where = "GPU"
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        where = "RSS"
    return {"tokens_per_s": len(timed) * s["seq"] / sum(timed), "peak_bytes": peak, "peak_of": where}


def run_p1(args) -> bool:
    s = sizes(args.tiny)
    print(f"1. P1 at real depth: {s['base']:,} + {s['new']:,} rows, {s['layers']} layers x {s['hidden']}, "
          f"seq {s['seq']} x batch 1, {args.steps} timed step(s) after 1", flush=True)  # fmt: skip
    results: dict[tuple[str, str], dict] = {}
    for precision in PRECISIONS:
        for variant in VARIANTS:
            if args.tiny:  # one process: toy memory figures mean nothing, and six imports of torch cost minutes
                r = results[(variant, precision)] = p1_worker(variant, precision, args)
            else:  # one process each, so each peak is its own
                cmd = [sys.executable, __file__, "--worker", f"{variant}:{precision}", "--cache", args.cache,
                       "--scratch", args.scratch, "--steps", str(args.steps)]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
                    print(f"   {variant:<7} {precision}: FAILED (exit {proc.returncode})", flush=True)
                    continue
                r = results[(variant, precision)] = json.loads(line[len("RESULT ") :])
            print(f"   {variant:<7} {precision}: {r['tokens_per_s']:>9,.0f} tokens/s, peak {r['peak_of']} "
                  f"{r['peak_bytes'] / 2**20:>9,.0f} MiB", flush=True)  # fmt: skip
    ok = len(results) == len(VARIANTS) * len(PRECISIONS)
    for precision in PRECISIONS:
        tokens, mask = results.get(("tokens", precision)), results.get(("mask", precision))
        if tokens and mask:
            ratio = tokens["peak_bytes"] / mask["peak_bytes"]
            verdict = "PASS" if ratio <= TARGET_MEMORY else "FAIL"
            print(f"   {precision}: tokens / mask peak memory = {ratio:.2f} (target <= {TARGET_MEMORY}) {verdict}")
    return ok


def disk_rate(folder: str, megabytes: int) -> float:
    """Bytes/s of a ``dd`` write with fsync into ``folder``."""
    path = os.path.join(folder, "dd.bin")
    started = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={megabytes}", "conv=fsync"],
                   check=True, capture_output=True)  # fmt: skip
    rate = megabytes * 2**20 / (time.monotonic() - started)
    os.remove(path)
    return rate


def run_wordybird(args) -> bool:
    steps = args.steps + 1
    out = os.path.join(args.scratch, "wordybird")
    stats = os.path.join(args.scratch, "wordybird-probe.json")
    sets = {"train.max_steps": steps, "train.save_steps": 10_000, "output_dir": out}
    if shutil.which("dict") is None and not os.path.exists("/usr/share/dictd/gcide.dict.dz"):
        sets.update({"data.corpus": "demo", "model.tokenizer": "offline-bpe"})
    if args.tiny:
        sets.update({"model.tokenizer_vocab_size": 2000, "data.corpus": "demo", "model.tokenizer": "offline-bpe",
                     "data.stride": 64, "train.batch_size": 4})  # fmt: skip
    cmd = [sys.executable, "-m", "wakelab", "run", "--preset", "wordybird", "--no-progress", "--plugin", PROBE_PLUGIN]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = dict(os.environ, WAKELAB_CACHE=args.cache, MLFLOW_TRACKING_URI=f"sqlite:///{args.scratch}/mlflow.db",
               WAKELAB_GPU_PROBE=stats)  # fmt: skip
    print(f"2. Wordybird, every field recorded: {steps} steps ({' '.join(f'{k}={v}' for k, v in sets.items())})",
          flush=True)  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=args.scratch)
    if proc.returncode != 0 or not os.path.exists(stats):
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        print(f"   FAILED (exit {proc.returncode})")
        return False
    probe = json.loads(open(stats).read())
    recorded = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs if "recording" in d)
    per_step = recorded / steps
    rate = disk_rate(args.scratch, 64 if args.tiny else 1024)
    speed = probe["steps_per_s"]
    bound = rate / per_step if per_step else float("inf")
    print(f"   {speed:.1f} steps/s on {probe['device']} = {speed / NOTEBOOK_STEPS_PER_S:.1f}x the notebook's "
          f"{NOTEBOOK_STEPS_PER_S} (target >= {TARGET_SPEEDUP}x)")  # fmt: skip
    print(f"   recorded {per_step / 2**20:.2f} MiB/step; disk writes {rate / 2**20:,.0f} MiB/s (dd, fsync): "
          f"disk-bound rate {bound:.1f} steps/s; run at {speed / bound:.0%} of it")  # fmt: skip
    verdict = speed >= TARGET_SPEEDUP * NOTEBOOK_STEPS_PER_S or speed >= 0.8 * bound
    print(f"   {'PASS' if verdict else 'FAIL'} (>= {TARGET_SPEEDUP}x, or within 80% of the disk-bound rate)")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (CI: keeps the script correct)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 6; 2 with --tiny)")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/wakelab-gpu-check"), help="WAKELAB_CACHE")
    parser.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("p1", "wordybird"), default=None)
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.tiny else 6)
    if args.worker:
        variant, precision = args.worker.split(":")
        print("RESULT " + json.dumps(p1_worker(variant, precision, args)), flush=True)
        return 0
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else "CPU"
    print(f"device: {device}; CPU {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores", flush=True)
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device: these figures are the GPU's; run with --tiny to check the script on the CPU")
        return 2
    if args.tiny:
        print("--tiny: toy sizes on the CPU, to check this script; PASS/FAIL below are the GPU's targets, not met here")
    os.makedirs(args.cache, exist_ok=True)
    args.scratch = tempfile.mkdtemp(prefix="wakelab-gpu-check-")
    try:
        ok = True
        if args.only in (None, "p1"):
            ok &= run_p1(args)
        if args.only in (None, "wordybird"):
            ok &= run_wordybird(args)
    finally:
        shutil.rmtree(args.scratch, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
