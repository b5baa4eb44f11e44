"""Random weights from ``model.architecture`` are stored in the dtype the run uses, as a pretrained checkpoint is."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from wakelab.model import materialize_architecture

ARCH = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 50}  # fmt: skip


def stored_dtypes(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {str(handle.get_slice(name).get_dtype()) for name in handle.keys()}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WAKELAB_CACHE", str(tmp_path / "cache"))


def test_bfloat16_runs_get_a_bfloat16_file_with_the_float32_values_rounded():
    import torch
    from safetensors.torch import load_file

    wide = materialize_architecture(ARCH, None, seed=3)
    narrow = materialize_architecture(ARCH, None, seed=3, dtype="bfloat16")
    assert wide != narrow and stored_dtypes(narrow) == {"BF16"} and stored_dtypes(wide) == {"F32"}
    for name, value in load_file(str(wide / "model.safetensors")).items():
        assert torch.equal(load_file(str(narrow / "model.safetensors"))[name], value.to(torch.bfloat16)), name


def test_float32_and_auto_keep_the_folder_they_always_had():
    assert materialize_architecture(ARCH, None, seed=3, dtype="auto") == materialize_architecture(ARCH, None, seed=3)
    assert materialize_architecture(ARCH, None, seed=3, dtype="float32") == materialize_architecture(ARCH, None, 3)
