"""On the real demo base (SmolLM2-135M-Instruct): its tokenizer round-trips the demo texts under both `add_as`
modes, and a short demo run exports to a folder that loads with transformers alone and generates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """One cache for the module, so the GGUF conversion happens once."""
    return os.environ.get("WAKELAB_CACHE") or str(tmp_path_factory.mktemp("wakelab-cache"))


@pytest.mark.parametrize("add_as", ["word", "plain"])
def test_demo_texts_round_trip_through_the_expanded_demo_tokenizer(demo_cache, monkeypatch, add_as):
    monkeypatch.setenv("WAKELAB_CACHE", demo_cache)
    from wakelab.data.demo import ensure_demo_model, ensure_demo_texts
    from wakelab.model import load_tokenizer
    from wakelab.vocab import expand_vocabulary, read_lexicon

    texts = ensure_demo_texts()
    tokenizer = load_tokenizer(str(ensure_demo_model()))
    num_base = len(tokenizer)
    expand_vocabulary(tokenizer, read_lexicon(texts.lexicon), add_as, str(texts.lexicon))
    for path in (texts.corpus, texts.heldout):
        text = path.read_text(encoding="utf-8")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert sum(i >= num_base for i in ids) > 100, path.name  # the texts do use the new words
        assert tokenizer.decode(ids) == text, path.name


def test_a_short_demo_run_exports_and_generates(tmp_path, demo_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = {
        **os.environ,
        "WAKELAB_CACHE": demo_cache,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("MLFLOW_RUN_ID", None)

    def wakelab(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "wakelab", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    wakelab("run", "--no-progress", "--max-steps", "3", "--set", "train.eval_perplexity=false")
    out = wakelab("export", "runs/demo", "--to", "exported/demo")
    assert "exported 223 new tokens" in out.stdout
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "exported/demo")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "exported/demo")
    assert model.config.vocab_size == len(tokenizer) == 49_152 + 223
    heldout = Path(demo_cache, "demo").glob("texts-*/heldout.txt")
    text = next(heldout).read_text(encoding="utf-8")[:600]
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == text
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    gen = wakelab("generate", "runs/demo", "The river", "--max-new-tokens", "8")
    assert gen.stdout.startswith("The river") and len(gen.stdout.strip()) > len("The river")
