"""The ``distill`` init's cost: seconds and peak memory per 1,000 new words, at the demo's width and at d=2048.

A Llama is built from a config with random weights at two shapes: the demo's base (SmolLM2-135M: d=576, 30 layers,
49,152 base tokens) and a d=2048 one (Llama-3.2-1B's shape: 16 layers, 128,256 base tokens). ``--words`` new words
(3 random base pieces each) are added, and a random corpus holds every word ``--snippets`` times. Each shape runs
in its own subprocess, which times the ``subword`` init and then the ``distill`` init (through the hook, as the
engine calls it) and reads the peak RSS of each init alone (``VmHWM``, reset before it; Linux only), so the
extra memory of distillation is its own, not hidden under the model build's peak.

What scales: distillation's time is linear in the snippets it reads (words x snippets per word), so the figure
printed per 1,000 words at the default 100 snippets a word is the measured seconds per snippet x 100,000. Its
memory is not: rows learn a chunk of 1,024 words at a time and snippets are cut from the token ids per batch, so
the extra peak over the loaded model is one batch's activations plus one chunk's rows and AdamW state.

``--layers N`` builds every shape N layers deep instead of its own depth (the time per snippet is close to linear
in the depth: the embedding lookups are cheap and no vocabulary logits are made; the memory of a batch grows with
it). ``--output-rows next_token`` gives the model an untied head and times learning its rows too.

Run (the d=2048 shape needs ~6 GiB at 16 layers, so under the shared lock):
    flock /tmp/wakelab-heavy.lock .venv/bin/python benchmarks/distill_init.py [--words 1000] [--snippets 1]
Target: the extra peak memory of distillation at d=2048 (its own 16 layers) stays under 1 GiB (one batch, one
chunk), whatever the number of words; the verdict is printed only for a shape built at its own depth.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SHAPES = {
    "demo (d=576)": {"hidden": 576, "layers": 30, "heads": 9, "kv": 3, "ffn": 1536, "vocab": 49152},
    "d=2048": {"hidden": 2048, "layers": 16, "heads": 32, "kv": 8, "ffn": 8192, "vocab": 128256},
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mib(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the last ``reset_peak``) of this process, in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Start ``VmHWM`` afresh (Linux: ``clear_refs`` 5), so an init's peak is not hidden under the model build's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def one(shape: dict, words: int, snippets: int, layers: int | None = None, output_rows: str = "subword") -> dict:
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from wakelab.hooks import registry
    from wakelab.hooks.context import InitContext
    from wakelab.plugins.distill import DistillConfig

    torch.manual_seed(0)
    base = shape["vocab"]
    config = LlamaConfig(
        vocab_size=base + words,
        hidden_size=shape["hidden"],
        intermediate_size=shape["ffn"],
        num_hidden_layers=layers or shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        max_position_embeddings=2048,
        tie_word_embeddings=output_rows != "next_token",
    )
    model = LlamaForCausalLM(config).eval()
    rng = np.random.default_rng(0)
    pieces = rng.integers(0, base, size=(words, 3))
    stream = rng.integers(0, base, size=words * snippets * 60)
    where = rng.choice(len(stream) // 60, size=words * snippets, replace=False) * 60 + 20
    stream[where] = base + np.repeat(np.arange(words), snippets)

    class Tokenizer:  # the words' pieces, as word_pieces reads them through a base tokenizer
        def encode(self, text, add_special_tokens=False):
            return pieces[int(text.strip()[1:])].tolist()

        def convert_ids_to_tokens(self, i):
            return str(i)

    class Config:
        distill = DistillConfig(snippets_per_word=snippets, output_rows=output_rows)

    weight = model.get_input_embeddings().weight

    def context(method):
        return InitContext(
            method=method,
            weight=weight.data,
            num_base=base,
            new_ids=torch.arange(base, base + words),
            new_words=[f"w{i}" for i in range(words)],
            tokenizer=Tokenizer(),
            base_tokenizer=Tokenizer(),
            options={"seed": 0, "scale": 1.0},
            generator=torch.Generator().manual_seed(0),
            log=lambda line: None,
            model=model,
            corpus_ids=lambda: stream,
            config=Config(),
        )

    result = {"rss_model_mib": status_mib("VmRSS"), "build_peak_mib": peak_mib()}
    for method in ("subword", "distill"):
        result[f"{method}_rss_before_mib"] = status_mib("VmRSS")
        reset_peak()
        started = time.perf_counter()
        with torch.no_grad():
            summary = registry.build_manager([method]).hook.init_embeddings(ctx=context(method))
        result[f"{method}_s"] = time.perf_counter() - started
        result[f"{method}_peak_mib"] = status_mib("VmHWM")
    result["snippets"] = summary["snippets"]
    result["steps"] = summary["steps"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=1000)
    parser.add_argument("--snippets", type=int, default=1, help="snippets per word actually read (timing scales)")
    parser.add_argument("--shape", choices=list(SHAPES), action="append")
    parser.add_argument("--layers", type=int, help="build every shape this deep (default: its own depth)")
    parser.add_argument("--output-rows", default="subword", choices=["subword", "next_token"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(SHAPES[args.child], args.words, args.snippets, args.layers, args.output_rows)))
        return
    import torch

    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    print(
        f"{args.words} words, {args.snippets} snippet(s) each of 50 tokens, batch 16, output rows {args.output_rows}; "
        "peak RSS in MiB"
    )
    verdicts = []
    for name in args.shape or list(SHAPES):
        command = [sys.executable, __file__, "--child", name, "--words", str(args.words)]
        command += ["--snippets", str(args.snippets), "--output-rows", args.output_rows]
        command += ["--layers", str(args.layers)] if args.layers else []
        out = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        per_snippet = r["distill_s"] / r["snippets"]
        extra = r["distill_peak_mib"] - r["distill_rss_before_mib"]
        depth = args.layers or SHAPES[name]["layers"]
        print(
            f"{name}, {depth} layers: model built {r['rss_model_mib']:.0f} (building peaked at "
            f"{r['build_peak_mib']:.0f}); subword {r['subword_s']:.2f} s (peak {r['subword_peak_mib']:.0f}); "
            f"distill {r['distill_s']:.1f} s for {r['snippets']} snippets in {r['steps']} steps = "
            f"{per_snippet:.3f} s/snippet (peak {r['distill_peak_mib']:.0f}: +{extra:.0f} over the RSS before it)"
        )
        print(
            f"    per 1,000 words: distill {per_snippet * 1000 * args.snippets:,.0f} s at {args.snippets} snippet(s) "
            f"a word, {per_snippet * 100_000:,.0f} s at the default 100; "
            f"subword {r['subword_s'] * 1000 / args.words:.2f} s"
        )
        own = SHAPES[name]["layers"]
        if depth != own:  # a batch's activations for the backward pass grow with the depth: say what that gives
            print(
                f"    at its own {own} layers: ~{per_snippet * own / depth * 1000 * args.snippets:,.0f} s per 1,000 "
                f"words at {args.snippets} snippet(s) a word, extra peak ~{extra * own / depth:,.0f} MiB "
                "(linear in the depth from this one: an upper bound, as fixed costs count once; not measured)"
            )
        elif name == "d=2048":
            verdicts.append(("extra peak at d=2048 < 1024 MiB", extra < 1024))
    for what, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}: {what}")


if __name__ == "__main__":
    main()
