"""Each rank's memory under ``train.distributed=ddp`` and ``fsdp``, 2 torchrun ranks (gloo, CPU), P1 proportions.

The base is a Llama built from ``model.architecture`` with Llama-3.2-1B's widths (d=2048, tied), 2 layers, 128,256
base rows (the offline BPE padded to that size, as ``p1_cli.py`` builds it) and 44,195 coined words; ``tokens``,
fp32, seq 256 x batch 1 per rank, 2 steps, no held-out passes, no plugin but a probe. Nothing is downloaded.

A probe plugin reads, on every rank, ``/proc/self/status`` at the first step (``on_run_start``: the model built,
sharded under FSDP, before training) and at the end, resetting the peak in between:

- ``setup peak``: the peak until training starts. Every rank builds the whole model, resizes it and fills the new
  rows before sharding (the order the issue asks for), so this is the same under both;
- ``RSS at start``: what the rank holds when training starts;
- ``train peak``: the peak during training (one unit gathered at a time under FSDP: here the embedding, the largest);
- ``base held``: the bytes of the frozen base parameters this rank holds (its DTensor shards under FSDP).

The base's share per rank under FSDP is read two ways: ``base held`` FSDP / DDP, and from RSS, 1 - (RSS at start
under DDP - under FSDP) / the whole base's bytes. Target: about 1/2 with 2 ranks.

  flock /tmp/wakelab-heavy.lock timeout 1200 python benchmarks/fsdp_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from p1_cli import LLAMA_1B, prepare, run_overrides, sets
from p1_shape import NUM_BASE, NUM_NEW

MiB = 1024**2

PROBE = '''
"""Memory figures of this rank at the start and the end of training (benchmarks/fsdp_memory.py)."""
import json
import os

import wakelab


def figure(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


FIGURES = {}


def local_bytes(param):
    tensor = param.to_local() if hasattr(param, "to_local") else param
    return tensor.numel() * tensor.element_size()


@wakelab.hookimpl
def on_run_start(run):
    frozen = [p for p in run.model.parameters() if not p.requires_grad]
    FIGURES.update(setup_peak=figure("VmHWM"), rss_start=figure("VmRSS"),
                   base_held=sum(local_bytes(p) for p in frozen),
                   base_whole=sum(p.numel() * p.element_size() for p in frozen))
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak: what follows is training's own
        f.write("5")


@wakelab.hookimpl
def on_run_end(run, status):
    FIGURES.update(train_peak=figure("VmHWM"), rss_end=figure("VmRSS"), run_status=status)
    with open(os.path.join(os.environ["FSDP_MEMORY_OUT"], f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(FIGURES, f)
'''


def run(args, folder: str, mode: str, overrides: dict) -> list[dict]:
    out = os.path.join(folder, mode)
    os.makedirs(out, exist_ok=True)
    env = dict(
        os.environ,
        WAKELAB_CACHE=args.cache,
        MLFLOW_TRACKING_URI=f"sqlite:///{folder}/mlflow.db",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        FSDP_MEMORY_OUT=out,
    )
    values = {**overrides, "train.distributed": mode, "output_dir": out}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "wakelab", "run", "--no-progress", *sets(values)]
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=folder, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{mode}: torchrun exited {proc.returncode}")
    print(f"{mode}: {time.monotonic() - started:.0f} s", flush=True)
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=2048, help="2048 (P1); smaller: a quick smoke test")
    parser.add_argument("--corpus-bytes", type=int, default=20_000)
    parser.add_argument("--keep", action="store_true", help="keep the runs' folder")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/wakelab-bench"), help="WAKELAB_CACHE")
    args = parser.parse_args()
    os.environ["WAKELAB_CACHE"] = args.cache
    args.eval_blocks = 1
    import torch

    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores; torch {torch.__version__}")
    folder = tempfile.mkdtemp(prefix="wakelab-fsdp-memory-")
    lexicon, corpus, _, _ = prepare(args, folder, NUM_NEW)
    arch = {**LLAMA_1B, "num_hidden_layers": args.layers}
    if args.hidden != LLAMA_1B["hidden_size"]:
        heads = args.hidden // 64
        arch.update(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_attention_heads=heads,
                    num_key_value_heads=max(1, heads // 4))  # fmt: skip
    overrides = run_overrides(args, arch, lexicon, corpus, num_base=NUM_BASE, seq=args.seq, batch=1)
    probe = os.path.join(folder, "memory_probe.py")
    with open(probe, "w") as f:
        f.write(PROBE)
    overrides.update({
        "plugins": f"[{probe}]", "train.eval_perplexity": "false", "tracking.system_metrics": "false",
        "tracking.log_datasets": "false", "train.logging_steps": 1,
    })  # fmt: skip
    try:
        figures = {mode: run(args, folder, mode, overrides) for mode in ("ddp", "fsdp")}
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)

    print(f"\n{NUM_BASE:,} + {NUM_NEW:,} rows, d={args.hidden}, {args.layers} layers, 2 ranks, seq {args.seq} x 1\n")
    print("| mode | rank | setup peak (MiB) | RSS at start (MiB) | train peak (MiB) | base held (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for mode, ranks in figures.items():
        for rank, f in enumerate(ranks):
            print(
                f"| {mode} | {rank} | {f['setup_peak'] / MiB:,.0f} | {f['rss_start'] / MiB:,.0f} | "
                f"{f['train_peak'] / MiB:,.0f} | {f['base_held'] / MiB:,.0f} |"
            )
    whole = figures["ddp"][0]["base_whole"]
    print(f"\nthe whole base: {whole / MiB:,.0f} MiB")
    for rank in (0, 1):
        ddp, fsdp = figures["ddp"][rank], figures["fsdp"][rank]
        held = fsdp["base_held"] / ddp["base_held"]
        from_rss = 1 - (ddp["rss_start"] - fsdp["rss_start"]) / whole
        print(
            f"rank {rank}: base share under FSDP: held {held:.3f}, from RSS at start {from_rss:.3f} (target ~0.5); "
            f"train peak FSDP / DDP {fsdp['train_peak'] / ddp['train_peak']:.2f}, "
            f"RSS at start FSDP / DDP {fsdp['rss_start'] / ddp['rss_start']:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
