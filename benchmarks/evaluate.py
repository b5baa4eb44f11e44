"""`wakelab evaluate` at the demo's size and at P1's proportions: time and memory, with the ratios that say why.

Two parts (each a fresh subprocess, so peak RSS is its own):

- ``demo``: ``wakelab evaluate RUN --no-mlflow`` on a finished demo run (``--run``, default ``runs/demo``), end to
  end, as a user runs it: wall seconds and peak RSS. The target is under 120 s on 2 CPU cores.
- ``p1``: a Llama built from a config with P1's vocabulary (128,256 base + 44,195 new rows; hidden and layers small,
  as the other P1 benchmarks build it), random held-out blocks with 10% new ids. Measured side by side:
  the class-split scorer (``score_positions``, ``chunk`` positions of logits at a time) against the direct
  ``log_softmax(model(ids).logits)`` over a whole block (peak RSS above the model, and seconds); and sampling with
  the KV cache, all prompts together as evaluate runs them, against one prompt at a time and against recomputing the
  whole sequence each token (seconds per token).
  No step forms a new x base matrix: the scorer's largest tensor is ``chunk x vocab``.

P1-size runs hold ~1 GiB: run them under the shared lock, e.g.
``flock /tmp/wakelab-heavy.lock .venv/bin/python benchmarks/evaluate.py p1``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from p1_shape import NUM_BASE, NUM_NEW, proc_status_kib, random_blocks, reset_peak_rss


def demo(run: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "wakelab", "evaluate", run, "--no-mlflow", "--out", out],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"part": "demo", "run": run, "seconds": round(seconds, 1), "peak_rss_mib": round(peak_kib / 1024),
            "target_seconds": 120, "table": proc.stdout}  # fmt: skip


def _p1_model(hidden: int, layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=NUM_BASE + NUM_NEW, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def p1_scoring(args) -> dict:
    """One way of scoring (``--way chunked|direct``) in this process: peak RSS above the loaded model, seconds."""
    import torch

    from wakelab.analysis.evaluate.token_classes import class_split, score_positions

    model = _p1_model(args.hidden, args.layers)
    ids, _ = random_blocks(args.blocks, args.seq_len, 0.10)
    base_kib = proc_status_kib("VmRSS")
    reset_peak_rss()
    started = time.perf_counter()
    if args.way == "chunked":
        split = class_split(score_positions(model, list(ids), NUM_BASE, chunk=256), NUM_BASE)
        loss = split["all"]["loss"]
    else:
        total, count = 0.0, 0
        with torch.no_grad():
            for block in ids:
                logp = torch.log_softmax(model(input_ids=block[None, :-1]).logits[0].float(), dim=-1)
                total += float(-logp.gather(1, block[1:, None]).sum())
                count += block.numel() - 1
        loss = total / count
    seconds = time.perf_counter() - started
    return {"way": args.way, "seconds": seconds, "peak_above_model_mib": (proc_status_kib("VmHWM") - base_kib) / 1024,
            "loss": loss}  # fmt: skip


def p1_sampling(args) -> dict:
    """Seconds per generated token: ``--prompts`` prompts sampled together (as evaluate does), one prompt at a time,
    and one prompt with the whole sequence recomputed each token (no KV cache)."""
    import torch

    from wakelab.analysis.evaluate.sampling import Sampling, sample

    model = _p1_model(args.hidden, args.layers)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, NUM_BASE, (args.prompt_len + i,), generator=g).tolist() for i in range(args.prompts)]
    settings = Sampling(temperature=0.8, top_p=0.95, max_new_tokens=args.new_tokens, seed=0)
    started = time.perf_counter()
    together = sample(model, prompts, args.samples, settings)
    batched = (time.perf_counter() - started) / args.new_tokens
    started = time.perf_counter()
    alone = [sample(model, [p], args.samples, settings, streams=[i])[0] for i, p in enumerate(prompts)]
    one_at_a_time = (time.perf_counter() - started) / args.new_tokens
    ids = torch.tensor([prompts[0]] * args.samples)
    started = time.perf_counter()
    with torch.no_grad():
        for _ in range(args.new_tokens):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(dim=1, keepdim=True)], dim=1)
    uncached = (time.perf_counter() - started) / args.new_tokens
    return {"batched_s_per_token": batched, "alone_s_per_token": one_at_a_time,
            "alone_per_prompt_s_per_token": one_at_a_time / args.prompts, "uncached_s_per_token": uncached,
            "same_samples": together == alone}  # fmt: skip


def _child(args, **extra) -> dict:
    argv = [sys.executable, __file__, "p1-worker", *[f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]]
    argv += [f"--hidden={args.hidden}", f"--layers={args.layers}", f"--blocks={args.blocks}",
             f"--seq-len={args.seq_len}", f"--prompts={args.prompts}", f"--samples={args.samples}"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).parent)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def p1(args) -> dict:
    chunked = _child(args, way="chunked")
    direct = _child(args, way="direct")
    sampling = _child(args, way="sampling")
    return {
        "part": "p1",
        "rows": f"{NUM_BASE:,} base + {NUM_NEW:,} new, hidden {args.hidden}, {args.layers} layers",
        "blocks": f"{args.blocks} x {args.seq_len} tokens",
        "scorer_seconds": round(chunked["seconds"], 2),
        "scorer_peak_above_model_mib": round(chunked["peak_above_model_mib"]),
        "direct_seconds": round(direct["seconds"], 2),
        "direct_peak_above_model_mib": round(direct["peak_above_model_mib"]),
        "memory_ratio_scorer_to_direct": round(chunked["peak_above_model_mib"] / direct["peak_above_model_mib"], 3),
        "same_loss": abs(chunked["loss"] - direct["loss"]) < 1e-4 * abs(direct["loss"]),
        "sampling_prompts": f"{args.prompts} prompts x {args.samples} samples, {args.new_tokens} tokens",
        "sampling_together_s_per_token": round(sampling["batched_s_per_token"], 4),
        "sampling_one_prompt_at_a_time_s_per_token": round(sampling["alone_s_per_token"], 4),
        "batching_speedup": round(sampling["alone_s_per_token"] / sampling["batched_s_per_token"], 2),
        "batched_same_samples": sampling["same_samples"],
        "one_prompt_cached_s_per_token": round(sampling["alone_per_prompt_s_per_token"], 4),
        "one_prompt_uncached_s_per_token": round(sampling["uncached_s_per_token"], 4),
        "kv_cache_speedup": round(sampling["uncached_s_per_token"] / sampling["alone_per_prompt_s_per_token"], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("demo", "p1", "p1-worker"))
    parser.add_argument("--run", default="runs/demo", help="demo: the finished demo run to evaluate")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--way", default="chunked", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=6)
    args = parser.parse_args()
    if args.part == "demo":
        result = demo(args.run)
        print(result.pop("table"))
    elif args.part == "p1":
        result = p1(args)
    else:
        result = p1_sampling(args) if args.way == "sampling" else p1_scoring(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
