"""Streaming dynamics analysis of a Wordybird-size recording vs loading it whole. Prints figures; asserts nothing.

Builds a synthetic recording with ``wakelab.storage.recording.RecordingWriter``: 101 steps (0..100) x 50,257 rows x 64,
bf16, fields embeddings, grads, exp_avg, exp_avg_sq, logits [50257], loss, lr (~2.6 GB), 10 steps a shard, plus a
``masks.safetensors`` (the first 30,000 rows trained). The values follow AdamW (float32 master weights stored as
bf16, cosine lr from 1e-3), so rows freeze, hop the bf16 lattice and have updates rounded away as in a real run.

Then, each in a fresh subprocess, wall time and peak RSS (``VmHWM``) of

  (a) ``wakelab.analysis.dynamics.from_recording.analyse_recording`` (displacement first->last, freeze verdict, freeze
      onset, bf16 lattice hops, centroid track; one streaming pass), then writing its tables and plots locally
      (``dynamics_outputs``, no MLflow) — the target is under 2 GB of RSS;
  (b) the notebook's way: ``safetensors.torch.load_file`` on every shard, then ``torch.cat`` per field;
  (c) a baseline: the same imports and nothing else.

The data is written to a temporary folder on the disk of ``--dir`` (default: the system temp dir) and deleted at the
end unless ``--keep``. The page cache is not dropped (that needs root): both (a) and (b) read a recording that was
just written, so the figures compare the work on the data, not disk speed.

    .venv/bin/python benchmarks/analyze_recording.py                 # full size, ~2.6 GB on disk, a few minutes
    .venv/bin/python benchmarks/analyze_recording.py --steps 11      # quick look
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS, DIM, TRAINED = 50257, 64, 30000


def build(path: Path, steps: int, rows: int, dim: int, steps_per_shard: int) -> float:
    """Write the synthetic recording; returns the seconds it took."""
    import torch
    from safetensors.torch import save_file

    from wakelab.storage.recording import FieldSpec, RecordingWriter

    bf16 = torch.bfloat16
    fields = {
        "embeddings": FieldSpec((rows, dim), bf16),
        "grads": FieldSpec((rows, dim), bf16),
        "exp_avg": FieldSpec((rows, dim), bf16),
        "exp_avg_sq": FieldSpec((rows, dim), bf16),
        "logits": FieldSpec((rows,), bf16),
        "loss": FieldSpec((), torch.float32),
        "lr": FieldSpec((), torch.float64),
    }
    trained = min(TRAINED, rows)
    meta = {
        "strategy": "full",
        "num_base": rows,
        "vocab_size": rows,
        "dtype": "bfloat16",
        "param_dtype": "bfloat16",
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "weight_decay": 0.0,
        "synthetic": True,
    }
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(rows, dim, generator=g) * 0.05).to(bf16)  # bf16 parameters, as in Wordybird
    m = torch.zeros(rows, dim)
    v = torch.zeros(rows, dim)
    b1, b2, eps, peak = 0.9, 0.999, 1e-8, 1e-3
    started = time.perf_counter()
    with RecordingWriter(path, fields, token_ids=range(rows), meta=meta, steps_per_shard=steps_per_shard) as writer:
        for step in range(steps):
            if step == 0:
                grad = torch.zeros(rows, dim)
                lr = math.nan
            else:
                grad = torch.zeros(rows, dim)
                grad[:trained] = torch.randn(trained, dim, generator=g) * 1e-3
                lr = peak * 0.5 * (1 + math.cos(math.pi * (step - 1) / max(steps - 1, 1)))
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                update = lr * (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
                weight = (weight.float() - update).to(bf16)
            writer.append(step, {
                "embeddings": weight, "grads": grad, "exp_avg": m, "exp_avg_sq": v,
                "logits": torch.randn(rows, generator=g), "loss": torch.tensor(10.0 / (1 + step)),
                "lr": torch.tensor(lr, dtype=torch.float64),
            })  # fmt: skip
    mask = torch.zeros(rows, dtype=torch.bool)
    mask[:trained] = True
    save_file({"trained_mask": mask, "untrained_mask": ~mask}, str(path / "masks.safetensors"))
    return time.perf_counter() - started


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM) in MiB.

    Not ``ru_maxrss``: Linux carries the parent's high-water mark over fork + exec into it, so a child started after
    the (large) build step would report the builder's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(kind: str, path: Path, out: Path) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import torch  # noqa: F401 - both sides pay for it
    from safetensors.torch import load_file

    from wakelab.analysis.dynamics.from_recording import analyse_recording
    from wakelab.analysis.report import dynamics_lines, dynamics_outputs
    from wakelab.analysis.sink import AnalysisSink
    from wakelab.storage.recording import open as open_recording

    result: dict = {"kind": kind, "rss_after_imports_mib": _peak_rss_mib()}
    started = time.perf_counter()
    if kind == "stream":
        dyn = analyse_recording(path)
        result["analyse_seconds"] = time.perf_counter() - started
        result["rss_after_analyse_mib"] = _peak_rss_mib()
        dynamics_outputs(dyn, AnalysisSink(out), "dynamics")
        result["summary"] = dynamics_lines(dyn)
    elif kind == "load":
        with open_recording(path) as rec:
            files = [path / s["file"] for s in rec.shards]
        loaded = [load_file(str(f)) for f in files]
        whole = {name: torch.cat([part[name] for part in loaded]) for name in loaded[0]}
        del loaded
        result["shapes"] = {k: list(t.shape) for k, t in whole.items()}
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mib"] = _peak_rss_mib()
    print(json.dumps(result))


def measure(kind: str, path: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(path), str(out)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=101, help="Recorded steps (101 = Wordybird: steps 0..100).")
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--steps-per-shard", type=int, default=10)
    parser.add_argument("--dir", default=None, help="Parent folder of the temporary recording (default: temp dir).")
    parser.add_argument("--keep", action="store_true", help="Keep the recording (its path is printed).")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "PATH", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, path, out = args.child
        child(kind, Path(path), Path(out))
        return

    work = Path(tempfile.mkdtemp(prefix="wakelab-analyze-bench-", dir=args.dir))
    path = work / "recording"
    try:
        size_gb = args.steps * args.rows * args.dim * 2 * 4 / 1e9
        free_gb = shutil.disk_usage(work).free / 1e9
        print(f"recording: {args.steps} steps x {args.rows} rows x {args.dim}, bf16, ~{size_gb:.2f} GB "
              f"({free_gb:.0f} GB free) -> {path}", flush=True)  # fmt: skip
        if free_gb < size_gb * 1.2:
            raise SystemExit(f"not enough free disk for {size_gb:.1f} GB at {work}; use --steps or --dir")
        seconds = build(path, args.steps, args.rows, args.dim, args.steps_per_shard)
        on_disk = sum(f.stat().st_size for f in path.iterdir()) / 1e9
        print(f"written in {seconds:.1f} s, {on_disk:.2f} GB on disk", flush=True)

        baseline = measure("baseline", path, work / "out")
        stream = measure("stream", path, work / "out")
        load = measure("load", path, work / "out")
        print()
        print("\n".join(stream["summary"]))
        print()
        print(f"{'':34} {'wall s':>8} {'peak RSS MiB':>13}")
        print(f"{'(c) imports only':34} {'':>8} {baseline['peak_rss_mib']:13.0f}")
        print(
            f"{'(a) streaming analysis + outputs':34} {stream['seconds']:8.1f} {stream['peak_rss_mib']:13.0f}"
            f"   (analysis alone {stream['analyse_seconds']:.1f} s, {stream['rss_after_analyse_mib']:.0f} MiB)"
        )
        print(f"{'(b) load_file every shard + cat':34} {load['seconds']:8.1f} {load['peak_rss_mib']:13.0f}")
        print(f"ratios (a)/(b): wall {stream['seconds'] / load['seconds']:.2f}, "
              f"peak RSS {stream['peak_rss_mib'] / load['peak_rss_mib']:.2f}; above imports: "
              f"{stream['peak_rss_mib'] - baseline['peak_rss_mib']:.0f} vs "
              f"{load['peak_rss_mib'] - baseline['peak_rss_mib']:.0f} MiB")  # fmt: skip
        verdict = "within" if stream["peak_rss_mib"] < 2048 else "OVER"
        print(f"streaming peak RSS {stream['peak_rss_mib']:.0f} MiB: {verdict} the 2 GB target")
    finally:
        if args.keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
