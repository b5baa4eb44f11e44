"""What taking a run out costs: wall time and size of `export --format hf`, `--format peft` and the logged delta.

Two shapes, each a real `wakelab.run.engine.run` of one training step on a model built from a config (random weights,
nothing downloaded), then the three ways out, timed side by side in this one process:

- demo-like: SmolLM2-135M's shape (49,152 base tokens, d = 576, 30 layers, tied) + 223 new words (the demo's count);
- P1: base 128,256 tokens + 44,195 new rows, d = 2048, a 2-layer Llama (tied), as the P1 notebook's expansion.

The base tokenizer is a byte-level one with the base's exact size (built offline); the lexicon is coined words.

- hf: `wakelab.export.formats.export(run, DIR, "hf")`: load base, check, resize, write rows, `save_pretrained`;
- peft: the same with `"peft"`: a TrainableTokens adapter (deltas only) + tokenizer;
- delta: `wakelab.run.logged_model.log_delta_model` (what every finished run logs): rows + tokenizer + base record.

Printed per shape: seconds and MiB of each, the ratios to hf (size and time), and each size over the raw bytes of
the new rows (num_new x d x 4). Targets: the delta holds nothing of the base (<= 1.1x the raw rows); the adapter
<= 2.2x (PEFT writes a tied head's delta again, next to the embedding's). At P1's shape the new rows are 345 MiB
in fp32 whatever the format: only the hf folder carries the base.
Run:  .venv/bin/python benchmarks/export.py [--only demo|p1]   (about 3-6 min on 2 busy CPU cores; ~6 GiB RAM)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "demo": {
        "num_base": 49_152,
        "num_new": 223,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
    },
    "p1": {
        "num_base": 128_256,
        "num_new": 44_195,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 2,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
}
TARGET_DELTA, TARGET_PEFT = 1.1, 2.2
MiB = 1024 * 1024


def folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / MiB


def byte_tokenizer(folder: Path, size: int) -> Path:
    """A byte-level tokenizer with exactly ``size`` tokens (the base's vocabulary size), saved offline: the 256 byte
    symbols and filler tokens, no merges, so a coined word is several tokens until it is added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(alphabet))}}
    vocab.update({f"<f{i}>": i for i in range(len(vocab), size)})
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return folder


def coined(count: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [f"wake{letters[i % 26]}{letters[(i // 26) % 26]}{letters[(i // 676) % 26]}{i}" for i in range(count)]


def bench(name: str, shape: dict, root: Path) -> dict:
    from wakelab.config import build_config
    from wakelab.export.formats import export, find_source
    from wakelab.run import engine
    from wakelab.run.logged_model import log_delta_model
    from wakelab.run.merge import BASE_INFO_FILE

    work = root / name
    work.mkdir()
    tok = byte_tokenizer(work / "tokenizer", shape["num_base"])
    (work / "lexicon.txt").write_text("\n".join(coined(shape["num_new"])) + "\n")
    words = coined(shape["num_new"])
    (work / "corpus.txt").write_text(" ".join(f"the river {words[i % len(words)]} ran" for i in range(400)) + "\n")
    arch = {
        "model_type": "llama",
        "tie_word_embeddings": True,
        "max_position_embeddings": 256,
        **{k: v for k, v in shape.items() if k not in ("num_base", "num_new")},
    }
    overrides = {
        "model.architecture": arch,
        "model.tokenizer": str(tok),
        "vocab.lexicon": str(work / "lexicon.txt"),
        "data.corpus": str(work / "corpus.txt"),
        "data.seq_len": 16,
        "train.max_steps": 1,
        "train.batch_size": 1,
        "train.eval_perplexity": False,
        "tracking.experiment": "bench-export",
        "output_dir": str(work / "run"),
        "tracking.log_tokenizer": False,
    }
    t0 = time.perf_counter()
    result = engine.run(build_config(None, None, overrides), progress=False)
    run_s = time.perf_counter() - t0
    figures = {"run_s": run_s}
    for fmt in ("hf", "peft"):
        t0 = time.perf_counter()
        export(str(result.output_dir), str(work / fmt), fmt)
        figures[f"{fmt}_s"] = time.perf_counter() - t0
        figures[f"{fmt}_mib"] = folder_mib(work / fmt)
    source = find_source(str(result.output_dir))
    from wakelab.export.formats import expanded_tokenizer
    from wakelab.run.merge import base_source

    tokenizer = expanded_tokenizer(source, base_source(source.config))
    t0 = time.perf_counter()
    model_id = log_delta_model(
        result.run_id, result.experiment_id, result.output_dir / "final", source.base, tokenizer, "word"
    )
    figures["delta_s"] = time.perf_counter() - t0
    import mlflow

    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(work / "delta")))
    figures["delta_mib"] = folder_mib(folder)
    assert (result.output_dir / "final" / BASE_INFO_FILE).exists()
    shutil.rmtree(work, ignore_errors=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SHAPES), default=None)
    args = parser.parse_args()
    import torch

    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    root = Path(tempfile.mkdtemp(prefix="wakelab-bench-export-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["WAKELAB_CACHE"] = str(root / "cache")
    verdict = True
    try:
        for name, shape in SHAPES.items():
            if args.only and name != args.only:
                continue
            f = bench(name, shape, root)
            print(
                f"\n{name}: base {shape['num_base']:,} + {shape['num_new']:,} new rows, d={shape['hidden_size']}, "
                f"{shape['num_hidden_layers']} layers (1-step run: {f['run_s']:.1f} s)"
            )
            raw = shape["num_new"] * shape["hidden_size"] * 4 / MiB
            print(f"  {'':6} {'seconds':>8} {'MiB':>10} {'time/hf':>8} {'size/hf':>8} {'size/rows':>9}")
            for kind in ("hf", "peft", "delta"):
                print(
                    f"  {kind:6} {f[kind + '_s']:8.2f} {f[kind + '_mib']:10.2f} {f[kind + '_s'] / f['hf_s']:8.3f} "
                    f"{f[kind + '_mib'] / f['hf_mib']:8.4f} {f[kind + '_mib'] / raw:9.3f}"
                )
            ok = f["delta_mib"] <= TARGET_DELTA * raw + 2 and f["peft_mib"] <= TARGET_PEFT * raw + 2  # + tokenizer
            verdict &= ok
            print(
                f"  target: delta <= {TARGET_DELTA}x and peft <= {TARGET_PEFT}x the raw new rows ({raw:.1f} MiB) "
                f"+ the tokenizer: {'PASS' if ok else 'FAIL'}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
