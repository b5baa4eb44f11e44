"""A run's GGUF export, run in llama.cpp itself (llama-cpp-python), against the hf export of the same run.

The demo run (SmolLM2-135M-Instruct, the base that came from a GGUF file) is trained for the module and exported
both ways. In llama.cpp the GGUF file must tokenize 50 held-out lines exactly as the hf export's tokenizer does,
give next-token logits close to the hf model's in fp32 (LOGIT_TOLERANCE), and, when greedy text from "The river"
uses a coined word under transformers, use one too. A tiny run (a safetensors base, GPT-2's pre-tokenizer) checks
the other path of the writer the same way.

llama-cpp-python is built from source (scripts/llama-cpp-python.sh caches the wheel): skipped where it is missing,
a failure under CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import run_store, tiny_overrides
from optional import require

from wakelab.cli.main import main

pytestmark = pytest.mark.slow

#: The largest |llama.cpp - transformers fp32| next-token logit allowed, as a fraction of the hf logits' range
#: (max - min over the vocabulary) at that position. Measured on the demo (AVX512 CPU, 6 prompts): f32 0.00054,
#: f16 0.00092, bf16 0.0101 (bf16 keeps 8 bits of mantissa); the bounds leave room for other CPUs' kernels.
LOGIT_TOLERANCE = {"f32": 0.005, "f16": 0.01, "bf16": 0.04}
PROMPTS = [
    "The river",
    "Once upon a time, the old ferryman",
    "A tired cat sat by the chapel and",
    "It was a frosty day, and Iris went to",
    "Beyond the hill there was a small",
]
DEMO_STEPS = 20  # greedy text already uses coined words at step 10 (the step-10 checkpoint of a 40-step run)


def llama(path: Path, **kwargs):
    llama_cpp = require("llama_cpp", "bash scripts/llama-cpp-python.sh")
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, seed=0, **kwargs)


def cpp_tokens(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def cpp_next_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)


def hf_next_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].double().numpy()


def relative_gap(cpp: np.ndarray, hf: np.ndarray) -> float:
    return float(np.abs(cpp - hf).max() / (hf.max() - hf.min()))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo trained for DEMO_STEPS, exported as hf and as f16, bf16 and f32 GGUF files."""
    require("llama_cpp", "bash scripts/llama-cpp-python.sh")
    root = tmp_path_factory.mktemp("demo-gguf")
    cache = os.environ.get("WAKELAB_CACHE") or str(root / "cache")
    env = {**os.environ, "WAKELAB_CACHE": cache, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)

    def wakelab(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "wakelab", *args], cwd=root, env=env, capture_output=True, text=True, timeout=1500
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    wakelab(
        "run", "--no-progress", "--max-steps", str(DEMO_STEPS),
        "--set", "train.eval_perplexity=false", "--set", "trajectory.enabled=false",
    )  # fmt: skip
    wakelab("export", "runs/demo", "--to", "hf")
    files = {}
    for outtype in ("f16", "bf16", "f32"):
        files[outtype] = root / f"demo-{outtype}.gguf"
        out = wakelab("export", "runs/demo", "--format", "gguf", "--outtype", outtype, "--to", files[outtype].name)
        assert "exported 223 new tokens (49,375 in all) as gguf" in out.stdout
    heldout = next(Path(cache, "demo").glob("texts-*/heldout.txt"))
    lexicon = next(Path(cache, "demo").glob("texts-*/lexicon.txt"))
    words = [w.strip() for w in lexicon.read_text().splitlines() if w.strip() and not w.startswith("#")]
    return {"root": root, "files": files, "heldout": heldout, "words": words}


@pytest.fixture(scope="module")
def hf(demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo["root"] / "hf", dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(demo["root"] / "hf")


def test_the_demo_gguf_keeps_its_base_files_metadata(demo):
    from gguf import GGUFReader

    from wakelab.data.demo import gguf_path

    ours, base = GGUFReader(demo["files"]["f16"]), GGUFReader(gguf_path())
    for key in ("tokenizer.ggml.pre", "tokenizer.chat_template", "llama.rope.freq_base", "general.name"):
        assert ours.fields[key].contents() == base.fields[key].contents(), key
    assert ours.fields["tokenizer.ggml.merges"].contents() == base.fields["tokenizer.ggml.merges"].contents()
    assert ours.fields["tokenizer.ggml.tokens"].contents()[:49_152] == base.fields["tokenizer.ggml.tokens"].contents()


def test_llama_cpp_tokenizes_50_heldout_lines_as_the_hf_export_does(demo, hf):
    _, tokenizer = hf
    lines = [line for line in demo["heldout"].read_text(encoding="utf-8").splitlines() if line.strip()][:50]
    assert len(lines) == 50
    llm = llama(demo["files"]["f16"], vocab_only=True)
    new_ids = 0
    for line in lines:
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        assert cpp_tokens(llm, line) == ids, line
        new_ids += sum(i >= 49_152 for i in ids)
    assert new_ids > 100  # the lines do use the added words, each as its one token
    assert cpp_tokens(llm, "The riverrun ran") == tokenizer("The riverrun ran", add_special_tokens=False)["input_ids"]
    assert llm.detokenize(tokenizer(lines[0], add_special_tokens=False)["input_ids"]).decode() == lines[0]


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_llama_cpp_next_token_logits_are_within_tolerance_of_the_hf_export(demo, hf, outtype):
    model, tokenizer = hf
    llm = llama(demo["files"][outtype], logits_all=True)
    gaps = []
    for prompt in PROMPTS + ["The riverrun ran past the"]:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        cpp, ref = cpp_next_logits(llm, ids), hf_next_logits(model, ids)
        assert cpp.shape == ref.shape == (49_375,)
        gaps.append(relative_gap(cpp, ref))
    print(f"{outtype}: max relative logit gap {max(gaps):.5f} over {len(gaps)} prompts")
    assert max(gaps) < LOGIT_TOLERANCE[outtype], gaps


def test_greedy_text_from_the_river_uses_a_coined_word_in_llama_cpp_when_it_does_in_transformers(demo, hf):
    model, tokenizer = hf
    ids = tokenizer("The river", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    hf_text = tokenizer.decode(out[0][ids.shape[1] :])
    llm = llama(demo["files"]["f16"])
    cpp_text = llm("The river", max_tokens=30, temperature=0.0, top_k=1)["choices"][0]["text"]
    print(f"transformers: The river{hf_text!r}\nllama.cpp:    The river{cpp_text!r}")

    def coined(text: str) -> set[str]:
        return {w for w in demo["words"] if f" {w}" in text}

    assert coined(hf_text), "the demo run should have learnt to use its words by now"
    assert coined(cpp_text)


def test_a_safetensors_base_runs_in_llama_cpp_with_the_same_tokens_and_logits(
    tiny_model, texts, tmp_path, empty_mlflow_db
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require("llama_cpp", "bash scripts/llama-cpp-python.sh")
    overrides = tiny_overrides(tiny_model, texts, **{"train.max_steps": 4, "train.eval_perplexity": False})
    run = run_store(tmp_path, empty_mlflow_db, {"T": overrides})["T"]
    for fmt, dest in (("hf", tmp_path / "hf"), ("gguf", tmp_path / "tiny.gguf")):
        result = CliRunner().invoke(
            main, ["export", str(run.output_dir), "--format", fmt, "--to", str(dest), "--outtype", "f32"]
        )
        assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    llm = llama(tmp_path / "tiny.gguf", logits_all=True)
    for line in texts["heldout"].read_text(encoding="utf-8").split(". ")[:20]:
        assert cpp_tokens(llm, line) == tokenizer(line, add_special_tokens=False)["input_ids"], line
    ids = tokenizer("The riverrun ran past the moonbrook", add_special_tokens=False)["input_ids"]
    assert any(i >= len(tokenizer) - 8 for i in ids)
    assert relative_gap(cpp_next_logits(llm, ids), hf_next_logits(model, ids)) < LOGIT_TOLERANCE["f32"]
