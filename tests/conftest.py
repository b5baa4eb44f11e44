"""Shared fixtures: tiny models built from a config and saved locally, small texts, an isolated MLflow store."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

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


def build_tokenizer(folder: Path):
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


def build_tiny_llama(folder: Path, max_positions: int = 128, hidden: int = TINY_HIDDEN) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def texts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("texts")
    paths = {
        "corpus": folder / "corpus.txt",
        "heldout": folder / "heldout.txt",
        "lexicon": folder / "lexicon.txt",
    }
    paths["corpus"].write_text(make_text(1, 400), encoding="utf-8")
    paths["heldout"].write_text(make_text(2, 60), encoding="utf-8")
    paths["lexicon"].write_text("# coined words\n\n" + "\n".join(COINED) + "\n", encoding="utf-8")
    return paths


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its schema made once: creating the tables takes seconds per store."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path, monkeypatch, empty_mlflow_db):
    """Every test tracks to its own SQLite store and caches under its own folder."""
    import shutil

    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setenv("WAKELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    yield
    while mlflow.active_run():
        mlflow.end_run()


def tiny_overrides(tiny_model: Path, texts: dict[str, Path], **extra) -> dict:
    """Config overrides for a fast run on the tiny model."""
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


def loaded_plugin(path: Path):
    """The module wakelab imported for a plugin file (to read what a throw-away plugin saw)."""
    import sys

    from wakelab.registry import module_name_for

    return sys.modules[module_name_for(path)]


def raising_plugin(tmp_path: Path, step: int, exc: str = "RuntimeError", message: str = "power cut") -> Path:
    """A throw-away plugin file whose on_step_end raises ``exc(message)`` at ``step`` (a crash, Ctrl-C, ...)."""
    plugin = tmp_path / f"raise_{exc}_at_{step}.py"
    plugin.write_text(
        "import wakelab\n@wakelab.hookimpl\ndef on_step_end(state):\n"
        f"    if state.step == {step}:\n        raise {exc}({message!r})\n"
    )
    return plugin
