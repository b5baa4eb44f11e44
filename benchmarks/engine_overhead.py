"""Training-loop overhead of a wakelab run (all plugins idle) against a plain ``transformers.Trainer``.

Both sides run through ``wakelab.engine.run`` on the same tiny Llama, tokenizer, corpus, new tokens and
``TrainingArguments``; the only difference is the Trainer that ``engine._build_trainer`` hands back:

- **wakelab**: the engine's own ``WakelabTrainer`` + ``HookBridge`` (hooks, MLflow metrics, progress bar), with the
  plugins a default run activates (``spherical`` for the init; it has no training-time hooks, so it is idle).
- **plain**: a stock ``transformers.Trainer`` built from the very same model, args, dataset and collator, with no
  callbacks of ours (Trainer's ``PrinterCallback`` removed too, as the engine removes it from its own).

Both models went through ``setup_trainable_rows(..., "tokens")``, so the same tensors train. Only the loop is timed:
a ``TrainerCallback`` records the time of every ``on_step_end``; steps/s is taken over the steps after a warm-up,
so set-up (model load, MLflow run, optimizer creation, first-step allocations) is not counted. Runs alternate
(wakelab, plain, plain, wakelab, ...) and the figure reported is the median of the per-pair ratios.

Run:  python benchmarks/engine_overhead.py [--pairs 7] [--steps 60] [--warmup 10]
Target: wakelab steps/s / plain steps/s >= 0.97.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGET = 0.97

WORDS = (
    "the river ran past the hill and the town slept while a bird sang over the water "
    "old men told stories of the sea and children laughed near the bridge at night"
).split()
COINED = ["riverrun", "glimmerous", "smirtle", "moonbrook", "thundersome", "wendelight", "crumbledown", "mistwhorl"]


def make_text(seed: int, sentences: int, coined=COINED) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 12))]
        words.insert(rng.randint(1, len(words)), rng.choice(coined))
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines) + "\n"


def build_model(folder: Path, hidden: int, layers: int, max_positions: int) -> Path:
    """A byte-level BPE tokenizer (400 tokens) and a random tiny Llama with tied embeddings, saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([make_text(s, 200, coined=["the"]) for s in range(3)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def make_step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall-clock time at every step end; consecutive differences are whole loop iterations (logging included)."""

        def __init__(self):
            self.stamps: list[float] = []
            self.train_seconds = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.stamps = [time.perf_counter()]
            self._begin = self.stamps[0]

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            self.train_seconds = time.perf_counter() - self._begin

        def steps_per_second(self, warmup: int) -> float:
            measured = self.stamps[warmup:]
            return (len(measured) - 1) / (measured[-1] - measured[0])

        def step_ms(self, warmup: int) -> list[float]:
            s = self.stamps[warmup:]
            return [(b - a) * 1000 for a, b in zip(s, s[1:])]

    return StepTimer()


def one_run(kind: str, base_overrides: dict, run_index: int, warmup: int, progress: bool) -> dict:
    """One engine run whose Trainer is wakelab's (kind='wakelab') or a plain one (kind='plain'); loop timings."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from wakelab import config as config_mod
    from wakelab import data as data_mod
    from wakelab import engine

    timer = make_step_timer()
    original = engine._build_trainer
    built = {}

    def build(*args, **kwargs):
        trainer = original(*args, **kwargs)
        if kind == "plain":
            trainer = Trainer(
                model=trainer.model,
                args=trainer.args,
                train_dataset=trainer.train_dataset,
                data_collator=data_mod.collate,
                processing_class=trainer.processing_class,
            )
            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
        trainer.add_callback(timer)
        built["trainer"] = trainer
        return trainer

    overrides = dict(base_overrides, output_dir=f"out-{kind}-{run_index}", **{"tracking.run_name": f"{kind}-{run_index}"})
    config = config_mod.build_config(preset=None, overrides=overrides)
    engine._build_trainer = build
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # the engine's log lines and bar
            engine.run(config, overwrite=True, progress=progress)
    finally:
        engine._build_trainer = original
    trainer = built["trainer"]
    return {
        "kind": kind,
        "class": type(trainer).__name__,
        "callbacks": [type(cb).__name__ for cb in trainer.callback_handler.callbacks],
        "steps": trainer.state.global_step,
        "steps_per_s": timer.steps_per_second(warmup),
        "median_step_ms": statistics.median(timer.step_ms(warmup)),
        "train_s": timer.train_seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=7, help="wakelab/plain pairs (>= 5)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--no-progress", action="store_true", help="run wakelab without its progress bar")
    args = parser.parse_args()
    if args.steps <= args.warmup + 1:
        parser.error("--steps must exceed --warmup + 1")

    tmp = Path(tempfile.mkdtemp(prefix="wakelab-bench-"))
    # Before mlflow or wakelab is imported: a private tracking store and cache, and a working directory of our own.
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["WAKELAB_CACHE"] = str(tmp / "cache")
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        os.environ.pop(key, None)
    os.chdir(tmp)

    import torch
    import transformers

    model_dir = build_model(tmp / "model", args.hidden, args.layers, max_positions=max(256, args.seq_len))
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

    print(f"engine_overhead: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus, {platform.machine()}")
    print(f"model: tiny Llama hidden={args.hidden} layers={args.layers} tied; seq_len={args.seq_len} "
          f"batch={args.batch}; {args.steps} steps per run, first {args.warmup} untimed; "
          f"logging every {args.logging_steps}; progress bar {'off' if args.no_progress else 'on'} (to /dev/null)")

    # One untimed run of each warms caches (tokenized corpus, imports, MLflow tables).
    for kind in ("wakelab", "plain"):
        first = one_run(kind, overrides, 0, args.warmup, not args.no_progress)
        print(f"warm-up run {kind:7s}: {first['class']} callbacks={first['callbacks']}")

    rows = []
    for pair in range(1, args.pairs + 1):
        order = ("wakelab", "plain") if pair % 2 else ("plain", "wakelab")
        result = {}
        for kind in order:
            result[kind] = one_run(kind, overrides, pair, args.warmup, not args.no_progress)
        ratio = result["wakelab"]["steps_per_s"] / result["plain"]["steps_per_s"]
        rows.append((order, result, ratio))
        print(f"pair {pair}: order {order[0]:>7s}->{order[1]:<7s} "
              f"wakelab {result['wakelab']['steps_per_s']:6.2f} steps/s ({result['wakelab']['median_step_ms']:6.1f} ms median) | "
              f"plain {result['plain']['steps_per_s']:6.2f} steps/s ({result['plain']['median_step_ms']:6.1f} ms median) | "
              f"ratio {ratio:.3f}", flush=True)

    ratios = [r for _, _, r in rows]
    wl = [res["wakelab"]["steps_per_s"] for _, res, _ in rows]
    pl = [res["plain"]["steps_per_s"] for _, res, _ in rows]
    median_ratio = statistics.median(ratios)
    print()
    print(f"wakelab steps/s: median {statistics.median(wl):.2f} (min {min(wl):.2f}, max {max(wl):.2f})")
    print(f"plain   steps/s: median {statistics.median(pl):.2f} (min {min(pl):.2f}, max {max(pl):.2f})")
    print(f"paired ratios  : {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"ratio of medians: {statistics.median(wl) / statistics.median(pl):.3f}")
    verdict = "PASS" if median_ratio >= TARGET else "FAIL"
    print(f"engine overhead: median paired ratio wakelab/plain = {median_ratio:.3f} (target >= {TARGET}) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
