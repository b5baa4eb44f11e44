"""`wakelab export --format gguf`: the file gguf's own reader sees holds the merged rows, the added words as
user-defined tokens, and the base laid out as llama.cpp reads it; bad input is one line and writes nothing.

One tiny run (the `tokens` strategy, a few steps) is trained for the module; the GGUF files are read back with
``gguf.GGUFReader`` and compared with the hf export of the same run. That llama.cpp itself runs them is checked in
test_gguf_llama_cpp_slow.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import run_store, tiny_overrides

from wakelab.cli.main import main
from wakelab.testing import COINED


@pytest.fixture(scope="module")
def runs(tiny_model, texts, tmp_path_factory, empty_mlflow_db):
    specs = {"T": tiny_overrides(tiny_model, texts, **{"train.max_steps": 4, "train.eval_perplexity": False})}
    return run_store(tmp_path_factory.mktemp("gguf-runs"), empty_mlflow_db, specs)


@pytest.fixture(scope="module")
def run(runs):
    return runs["T"]


@pytest.fixture(scope="module")
def hf_export(run, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = tmp_path_factory.mktemp("hf") / "hf"
    result = CliRunner().invoke(main, ["export", str(run.output_dir), "--to", str(dest)])
    assert result.exit_code == 0, result.output
    return AutoModelForCausalLM.from_pretrained(dest), AutoTokenizer.from_pretrained(dest)


def export_gguf(run, dest, *extra):
    return CliRunner().invoke(main, ["export", str(run.output_dir), "--format", "gguf", "--to", str(dest), *extra])


def tensor(reader, name) -> np.ndarray:
    from gguf import quants

    found = next(t for t in reader.tensors if t.name == name)
    return quants.dequantize(found.data, found.tensor_type).reshape([int(d) for d in reversed(found.shape.tolist())])


def test_gguf_holds_the_merged_rows_and_the_added_words_as_user_defined_tokens(run, hf_export, tmp_path):
    from gguf import GGUFReader, TokenType

    model, tokenizer = hf_export
    dest = tmp_path / "tiny.gguf"
    result = export_gguf(run, dest, "--outtype", "f32")
    assert result.exit_code == 0, result.output
    assert f"exported 8 new tokens ({len(tokenizer):,} in all) as gguf to {dest}" in result.output
    reader = GGUFReader(dest)
    field = reader.fields
    assert field["general.architecture"].contents() == "llama"
    assert field["tokenizer.ggml.model"].contents() == "gpt2"
    assert field["tokenizer.ggml.pre"].contents() == "gpt-2"  # a plain ByteLevel pre-tokenizer is GPT-2's regex
    assert field["llama.vocab_size"].contents() == len(tokenizer)
    assert field["wakelab.run_id"].contents() == run.run_id
    tokens = field["tokenizer.ggml.tokens"].contents()
    types = field["tokenizer.ggml.token_type"].contents()
    num_base = len(tokenizer) - 8
    assert tokens[:num_base] == [tokenizer.convert_ids_to_tokens(i) for i in range(num_base)]
    assert tokens[num_base:] == [" " + w for w in COINED]  # the text llama.cpp matches, with its space
    assert set(types[num_base:]) == {TokenType.USER_DEFINED}
    assert types[0] == TokenType.CONTROL and set(types[1:num_base]) == {TokenType.NORMAL}
    assert len(field["tokenizer.ggml.merges"].contents()) > 100
    embedding = model.get_input_embeddings().weight.detach().numpy()
    assert np.array_equal(tensor(reader, "token_embd.weight"), embedding)  # f32: bit for bit, new rows included
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd
    # q and k rows are reordered for llama.cpp's rope, as convert_hf_to_gguf.py does; v is not.
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    v = model.model.layers[0].self_attn.v_proj.weight.detach().numpy()
    gguf_q = tensor(reader, "blk.0.attn_q.weight")
    assert gguf_q.shape == q.shape and not np.array_equal(gguf_q, q)
    assert np.array_equal(np.sort(gguf_q, axis=0), np.sort(q, axis=0))
    assert np.array_equal(tensor(reader, "blk.0.attn_v.weight"), v)


@pytest.mark.parametrize(
    ("outtype", "kind", "tolerance"), [("f16", "F16", 1e-3), ("bf16", "BF16", 1e-2), ("q8_0", "Q8_0", 2e-2)]
)
def test_each_outtype_writes_its_tensor_type_and_keeps_norms_f32(run, hf_export, tmp_path, outtype, kind, tolerance):
    from gguf import GGUFReader, LlamaFileType

    model, _ = hf_export
    dest = tmp_path / f"tiny-{outtype}.gguf"
    assert export_gguf(run, dest, "--outtype", outtype).exit_code == 0
    reader = GGUFReader(dest)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["token_embd.weight"] == kinds["blk.0.ffn_up.weight"] == kind
    assert kinds["blk.0.attn_norm.weight"] == kinds["output_norm.weight"] == "F32"
    assert (
        reader.fields["general.file_type"].contents()
        == {
            "f16": LlamaFileType.MOSTLY_F16,
            "bf16": LlamaFileType.MOSTLY_BF16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0,
        }[outtype]
    )
    embedding = model.get_input_embeddings().weight.detach().numpy()
    assert np.abs(tensor(reader, "token_embd.weight") - embedding).max() < tolerance * np.abs(embedding).max()


def test_to_mlflow_logs_the_gguf_file_beside_the_full_model(runs, tmp_path, monkeypatch):
    import mlflow
    from gguf import GGUFReader

    monkeypatch.setenv("MLFLOW_TRACKING_URI", runs["uri"])
    mlflow.set_tracking_uri(runs["uri"])
    run = runs["T"]
    result = CliRunner().invoke(main, ["export", run.run_id, "--format", "gguf", "--to", "mlflow", "--outtype", "q8_0"])
    assert result.exit_code == 0, result.output
    uri = result.output.split("logged the full model: ")[1].split()[0]
    assert "gguf/model-q8_0.gguf" in result.output
    logged = mlflow.MlflowClient().get_logged_model(uri.removeprefix("models:/"))
    folder = Path(mlflow.artifacts.download_artifacts(f"{logged.artifact_location}/gguf", dst_path=str(tmp_path)))
    assert [p.name for p in folder.iterdir()] == ["model-q8_0.gguf"]
    reader = GGUFReader(folder / "model-q8_0.gguf")
    assert reader.fields["wakelab.run_id"].contents() == run.run_id
    assert reader.fields["tokenizer.ggml.tokens"].contents()[-8:] == [" " + w for w in COINED]
    assert mlflow.transformers.load_model(uri, return_type="components")["tokenizer"] is not None  # the model too


def test_an_untied_head_is_written_as_output(tiny_model, texts, tmp_path, empty_mlflow_db):
    from gguf import GGUFReader
    from test_export import untied_copy

    from wakelab.run.merge import TrainedRows

    base = untied_copy(tiny_model, tmp_path / "untied")
    overrides = tiny_overrides(base, texts, **{"train.max_steps": 2, "train.eval_perplexity": False})
    untied = run_store(tmp_path, empty_mlflow_db, {"U": overrides})["U"]
    dest = tmp_path / "untied.gguf"
    assert export_gguf(untied, dest, "--outtype", "f32").exit_code == 0
    reader = GGUFReader(dest)
    trained = TrainedRows.read(untied.output_dir / "final" / "new_rows.safetensors", {})
    ids = trained.token_ids.numpy()
    output, embd = tensor(reader, "output.weight"), tensor(reader, "token_embd.weight")
    assert trained.head_rows is not None
    assert np.array_equal(output[ids], trained.head_rows.float().numpy())
    assert np.array_equal(embd[ids], trained.rows.float().numpy())
    assert not np.array_equal(output[: ids.min()], embd[: ids.min()])  # the base head is its own matrix (x 0.5)


def test_gpt2_is_written_with_its_conv1d_weights_transposed(tmp_path):
    from gguf import GGUFReader
    from transformers import GPT2Config, GPT2LMHeadModel

    from wakelab.export.gguf import write_gguf
    from wakelab.testing import build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tok")
    num_base = len(tokenizer)
    tokenizer.add_tokens(["riverrun"])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    result = write_gguf(model, tokenizer, num_base, tmp_path / "g.gguf", outtype="f32")
    assert (result.n_vocab, result.new_tokens) == (num_base + 1, 1)
    reader = GGUFReader(tmp_path / "g.gguf")
    assert reader.fields["general.architecture"].contents() == "gpt2"
    assert reader.fields["gpt2.context_length"].contents() == 64
    assert reader.fields["tokenizer.ggml.tokens"].contents()[-1] == "riverrun"
    c_attn = model.transformer.h[0].attn.c_attn.weight.detach().numpy()  # Conv1D: (in, out)
    assert np.array_equal(tensor(reader, "blk.0.attn_qkv.weight"), c_attn.T)
    assert np.array_equal(tensor(reader, "position_embd.weight"), model.transformer.wpe.weight.detach().numpy())
    assert np.array_equal(tensor(reader, "token_embd.weight"), model.transformer.wte.weight.detach().numpy())


def test_an_architecture_it_does_not_write_is_one_line_naming_the_ones_it_does(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    from wakelab.export.gguf import GgufExportError, write_gguf
    from wakelab.testing import build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tok")
    model = MistralForCausalLM(
        MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    )
    with pytest.raises(GgufExportError, match=r"model_type 'mistral'.*llama \(llama\), gpt2 \(gpt2\)") as err:
        write_gguf(model, tokenizer, len(tokenizer), tmp_path / "m.gguf")
    assert "\n" not in str(err.value)
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".partial-*")) == []


def test_an_existing_file_is_kept_without_overwrite_and_replaced_with_it(run, tmp_path):
    dest = tmp_path / "taken.gguf"
    dest.write_bytes(b"keep me")
    result = export_gguf(run, dest)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"wakelab: error: --to {dest} exists; pass --overwrite to replace it, or choose another file"
    ]
    assert dest.read_bytes() == b"keep me"
    assert export_gguf(run, dest, "--overwrite").exit_code == 0
    assert dest.read_bytes()[:4] == b"GGUF" and list(tmp_path.glob(".partial-*")) == []


def test_a_run_whose_base_is_gone_is_one_line_and_writes_nothing(run, tmp_path):
    import shutil

    import yaml

    copy = tmp_path / "moved"
    shutil.copytree(run.output_dir, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"]["name_or_path"] = str(tmp_path / "no-such-base")
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    dest = tmp_path / "out.gguf"
    result = CliRunner().invoke(main, ["export", str(copy), "--format", "gguf", "--to", str(dest)])
    assert result.exit_code == 2, result.output
    # wakelab's own words are one line (MLflow 3.9 may log its store's migration on a fresh database: not ours)
    ours = [line for line in result.output.splitlines() if line.startswith("wakelab")]
    assert len(ours) == 1 and ours[0].startswith("wakelab: error: ") and "no-such-base" in ours[0], result.output
    assert "Traceback" not in result.output
    assert not dest.exists() and list(tmp_path.glob(".partial-*")) == []


def test_added_tokens_gguf_cannot_describe_are_named_in_a_note(tmp_path):
    from tokenizers import AddedToken

    from wakelab.export.gguf import unmatched_flags
    from wakelab.testing import build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tok")
    num_base = len(tokenizer)
    tokenizer.add_tokens([AddedToken(" riverrun", normalized=False)])
    assert unmatched_flags(tokenizer, num_base) is None  # wakelab's add_as=word tokens: nothing lost
    tokenizer.add_tokens([AddedToken("moonbrook", single_word=True), AddedToken("smirtle", lstrip=True)])
    note = unmatched_flags(tokenizer, num_base)
    assert note.startswith("2 added tokens are single_word/lstrip/rstrip (first: 'moonbrook')")
