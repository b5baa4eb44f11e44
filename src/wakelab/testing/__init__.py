"""Test a plugin the way wakelab tests its own: a real run on a tiny model built offline in seconds.

A plugin's tests should go through the public mechanism (activate the plugin, run, read what it saw and what MLflow
got), not call the engine's internals. This module ships the helpers wakelab's own test suite uses::

    from wakelab.testing import run_with_plugins, loaded_plugin

    def test_my_plugin(tmp_path):
        result = run_with_plugins(["my_plugin"], tmp_path, {"my_plugin.threshold": 0.5})
        assert (result.output_dir / "my_plugin.json").exists()

Nothing is downloaded: the model is a two-layer Llama with a byte-level BPE tokenizer trained on generated text,
and the corpus, held-out text and lexicon are generated too. Track to a throw-away MLflow store by setting
``MLFLOW_TRACKING_URI`` (e.g. ``sqlite:///{tmp_path}/mlflow.db``) before the run.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

WORDS = (
    "the river ran past the hill and the town slept while a bird sang over the water "
    "old men told stories of the sea and children laughed near the bridge at night"
).split()
COINED = ["riverrun", "glimmerous", "smirtle", "moonbrook", "thundersome", "wendelight", "crumbledown", "mistwhorl"]


def make_text(seed: int, sentences: int, coined: Iterable[str] = COINED) -> str:
    """Plain sentences with one coined word each: enough structure for a loss that falls in a few steps."""
    coined = list(coined)
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 12))]
        words.insert(rng.randint(1, len(words)), rng.choice(coined))
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines) + "\n"


def build_tokenizer(folder: Path):
    """A 400-token byte-level BPE trained on generated text (the coined words stay unknown to it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([make_text(s, 200, coined=["the"]) for s in range(3)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


# Widths every bitsandbytes path supports: its CPU inference packing needs multiples of 64 (see wakelab.quantized).
TINY_HIDDEN = 64


def build_tiny_llama(folder: Path, max_positions: int = 128, hidden: int = TINY_HIDDEN, layers: int = 2) -> Path:
    """A small Llama (``hidden`` wide, ``layers`` deep), tied embeddings, and its tokenizer, saved into ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
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
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return folder


def write_texts(folder: Path) -> dict[str, Path]:
    """A corpus, a held-out text and a lexicon of the coined words, in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": folder / "corpus.txt", "heldout": folder / "heldout.txt", "lexicon": folder / "lexicon.txt"}
    paths["corpus"].write_text(make_text(1, 400), encoding="utf-8")
    paths["heldout"].write_text(make_text(2, 60), encoding="utf-8")
    paths["lexicon"].write_text("# coined words\n\n" + "\n".join(COINED) + "\n", encoding="utf-8")
    return paths


def tiny_overrides(tiny_model: Path, texts: dict[str, Path], **extra: Any) -> dict[str, Any]:
    """Config overrides for a fast run (6 steps, 32-token blocks) on the tiny model; ``extra`` wins."""
    values = {
        "model.name_or_path": str(tiny_model),
        "vocab.lexicon": str(texts["lexicon"]),
        "data.corpus": str(texts["corpus"]),
        "data.heldout": str(texts["heldout"]),
        "data.seq_len": 32,
        "train.max_steps": 6,
        "train.batch_size": 2,
        "train.logging_steps": 2,
        "train.lr": 1e-2,
        "tracking.experiment": "tests",
        "output_dir": "out",
    }
    values.update(extra)
    return values


def run_with_plugins(
    plugins: Iterable[str | Path],
    workdir: Path,
    overrides: dict[str, Any] | None = None,
    *,
    cwd: Path | None = None,
):
    """One tiny run in ``workdir`` with ``plugins`` (names or .py paths) active; returns the run's ``RunResult``.

    The tiny model and texts are built once per ``workdir``. ``overrides`` are ``{key: value}`` config values,
    the plugins' own sections included (``{"my_plugin.every": 2}``); ``cwd`` is where ``./plugins`` is searched.
    """
    from ..config import build_config
    from ..run.engine import run

    workdir = Path(workdir)
    model = workdir / "tiny-model"
    if not (model / "config.json").exists():
        model.mkdir(parents=True, exist_ok=True)
        build_tiny_llama(model)
    texts = write_texts(workdir / "texts")
    values = {**tiny_overrides(model, texts, output_dir=str(workdir / "out")), **(overrides or {})}
    config = build_config(None, None, values, plugins=[str(p) for p in plugins], cwd=cwd)
    return run(config, progress=False, cwd=cwd)


def loaded_plugin(path: Path) -> ModuleType:
    """The module wakelab imported for a plugin file (to read what a throw-away plugin saw)."""
    from ..hooks.registry import module_name_for

    return sys.modules[module_name_for(Path(path))]
