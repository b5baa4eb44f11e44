"""`wakelab export` / `generate` and the run's logged model: what a run trained loads outside wakelab.

Two tiny runs are trained once for the module in their own MLflow store: M (train.trainable=mask, trained hard
enough that greedy text uses new words, with checkpoints) and T (the default `tokens` strategy, 4 steps). Tests
export them and load the results with transformers, PEFT and MLflow alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_text, raising_plugin, run_store, tiny_overrides

from wakelab.cli.main import main
from wakelab.config import build_config
from wakelab.errors import ModelError, WakelabError
from wakelab.export.formats import ExportError, export
from wakelab.run import engine
from wakelab.run.state import load_trained

PROMPT = "The riverrun ran past the moonbrook and the smirtle hill"


@pytest.fixture(scope="module")
def runs(tiny_model, texts, tmp_path_factory, empty_mlflow_db):
    specs = {
        "M": {
            "train.trainable": "mask",
            "train.max_steps": 60,
            "train.lr": 0.1,
            "train.save_steps": 20,
            "plugins": ["mask"],
        },
        "T": {"train.max_steps": 4, "train.eval_perplexity": False, "tracking.log_model": "none"},
    }
    specs = {name: tiny_overrides(tiny_model, texts, **extra) for name, extra in specs.items()}
    return run_store(tmp_path_factory.mktemp("export-runs"), empty_mlflow_db, specs)


@pytest.fixture
def store(runs, monkeypatch):
    """Point MLflow at the module's store (the runs' ids resolve there)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", runs["uri"])
    mlflow.set_tracking_uri(runs["uri"])
    return runs


def logits(model, tokenizer, text=PROMPT):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits, ids


def test_hf_export_loads_offline_with_identical_logits_and_generates_new_words(runs, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = runs["M"]
    dest = tmp_path / "hf"
    result = CliRunner().invoke(main, ["export", str(run.output_dir), "--to", str(dest)])
    assert result.exit_code == 0, result.output
    assert "exported 8 new tokens" in result.output
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "wakelab_export.json"):
        assert (dest / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(dest)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    state = load_trained(run.output_dir)
    num_base = state.rows.num_base
    assert model.config.vocab_size == len(tokenizer) == num_base + 8
    assert (
        model.config.tie_word_embeddings and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    ours, ids = logits(state.model, state.tokenizer)
    theirs, their_ids = logits(model, tokenizer)
    assert torch.equal(ids, their_ids) and (ids >= num_base).sum() == 3  # the prompt's three new words
    assert torch.equal(ours, theirs)  # bit-identical in fp32
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    new = out[0, ids.shape[1] :]
    assert (new >= num_base).any(), tokenizer.decode(new)
    text = tokenizer.decode(out[0])
    assert text.startswith(PROMPT) and tokenizer.decode(tokenizer(text)["input_ids"]) == text
    info = json.loads((dest / "wakelab_export.json").read_text())
    assert (
        info["run_id"] == run.run_id
        and info["base"]["num_base"] == num_base
        and len(info["base"]["base_checksum"]) == 64
    )


def test_peft_adapter_loads_on_the_resized_base_with_the_same_logits(runs, tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = runs["M"]
    hf, adapter = tmp_path / "hf", tmp_path / "peft"
    export(str(run.output_dir), str(hf), "hf")
    export(str(run.output_dir), str(adapter), "peft")
    assert (adapter / "adapter_model.safetensors").stat().st_size < (hf / "model.safetensors").stat().st_size / 10
    # The README's lines:
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model = PeftModel.from_pretrained(base, adapter)
    merged = AutoModelForCausalLM.from_pretrained(hf)
    theirs, ids = logits(model, tokenizer)
    assert torch.equal(theirs, logits(merged, tokenizer)[0])
    assert torch.equal(theirs, logits(load_trained(run.output_dir).model, tokenizer)[0])
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "TRAINABLE_TOKENS"


def test_tokens_strategy_export_holds_the_trained_rows(runs, tmp_path):
    """`tokens` (the default) trains a split head (two products); read back, the run is one matrix like the export."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = runs["T"]
    dest = tmp_path / "hf"
    export(str(run.output_dir), str(dest), "hf")
    model = AutoModelForCausalLM.from_pretrained(dest)
    saved = load_file(str(run.output_dir / "final" / "new_rows.safetensors"))
    assert torch.equal(model.get_input_embeddings().weight[saved["token_ids"]], saved["rows"])
    state = load_trained(run.output_dir)
    ours, _ = logits(state.model, state.tokenizer)
    theirs, _ = logits(model, AutoTokenizer.from_pretrained(dest))
    assert state.rows.values(saved["token_ids"]).equal(saved["rows"])
    assert torch.equal(ours, theirs)  # bit-identical in fp32, as under `mask`


def test_each_finished_run_has_a_small_logged_delta_model(store):
    run = store["M"]
    models = mlflow.search_logged_models(
        experiment_ids=[run.experiment_id], filter_string="name = 'wakelab-delta'", output_format="list"
    )
    mine = [m for m in models if m.source_run_id == run.run_id]
    assert len(mine) == 1 and mine[0].status.to_int() == mlflow.entities.LoggedModelStatus.READY.to_int()
    params = mine[0].params
    assert params["new_tokens"] == "8" and params["base_model"] and len(params["base.base_checksum"]) == 64
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{mine[0].model_id}"))
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"new_rows.safetensors", "base.json", "tokenizer/tokenizer.json"} <= names
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 1_000_000
    outputs = mlflow.get_run(run.run_id).outputs.model_outputs
    assert mine[0].model_id in {o.model_id for o in outputs}
    assert not [m for m in models if m.source_run_id == store["T"].run_id]  # tracking.log_model=none


def untied_copy(tiny_model, folder):
    """The tiny model with its own head (half the embedding), saved as a base."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_model, folder)
    base = AutoModelForCausalLM.from_pretrained(folder, tie_word_embeddings=False)
    base.config.tie_word_embeddings = False
    with torch.no_grad():
        base.lm_head.weight = torch.nn.Parameter(base.model.embed_tokens.weight.clone() * 0.5)
    base.save_pretrained(folder)
    return folder


def test_an_untied_heads_new_rows_start_the_same_in_every_run(tiny_model, texts, tmp_path):
    from wakelab.run.build import expand_for_config

    config = build_config(None, None, tiny_overrides(untied_copy(tiny_model, tmp_path / "untied"), texts))
    heads = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # whatever the process drew before the run
        model, _, num_base, _ = expand_for_config(config)
        heads.append(model.lm_head.weight[num_base:].detach().clone())
    assert heads[0].shape[0] > 0 and heads[0].abs().sum() > 0
    assert torch.equal(heads[0], heads[1])


def test_an_untied_head_keeps_its_own_rows_through_run_export_and_full_logged_model(
    tiny_model, texts, tmp_path, capsys
):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    untied = untied_copy(tiny_model, tmp_path / "untied")
    overrides = tiny_overrides(
        untied,
        texts,
        **{
            "train.max_steps": 4,
            "train.lr": 0.05,
            "train.save_steps": 2,
            "train.eval_perplexity": False,
            "tracking.log_model": "full",
        },
    )
    result = engine.run(build_config(None, None, overrides), progress=False)
    assert "could not log the run's model" not in capsys.readouterr().err
    saved = load_file(str(result.output_dir / "final" / "new_rows.safetensors"))
    assert "head_rows" in saved and not torch.equal(saved["head_rows"], saved["rows"])
    assert "head_rows" in load_file(str(result.output_dir / "checkpoint-4" / "trained_rows.safetensors"))
    export(str(result.output_dir), str(tmp_path / "hf"), "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight[saved["token_ids"]], saved["head_rows"])
    assert torch.equal(model.get_input_embeddings().weight[saved["token_ids"]], saved["rows"])
    state = load_trained(result.output_dir)
    assert torch.equal(logits(state.model, state.tokenizer)[0], logits(model, tokenizer)[0])  # bit-identical in fp32
    export(str(result.output_dir), str(tmp_path / "peft"), "peft")
    resized = AutoModelForCausalLM.from_pretrained(untied)
    resized.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    adapter = PeftModel.from_pretrained(resized, tmp_path / "peft")
    assert torch.equal(logits(adapter, tokenizer)[0], logits(model, tokenizer)[0])
    full = [
        m
        for m in mlflow.search_logged_models(experiment_ids=[result.experiment_id], output_format="list")
        if m.source_run_id == result.run_id
    ]
    assert [m.name for m in full] == ["wakelab-model"]
    loaded = mlflow.transformers.load_model(full[0].model_uri, return_type="components")["model"]
    assert torch.equal(logits(loaded, tokenizer)[0], logits(model, tokenizer)[0])
    # A resumed run takes the head's rows from the checkpoint (here with nothing left to train: they pass through).
    with pytest.raises(RuntimeError, match="power cut"):
        engine.run(
            build_config(
                None,
                None,
                {
                    **overrides,
                    "output_dir": "split",
                    "tracking.log_model": "none",
                    "plugins": [str(raising_plugin(tmp_path, step=3))],
                },
            ),
            progress=False,
        )
    resumed = engine.run(
        build_config(
            None, None, {**overrides, "output_dir": "split", "tracking.log_model": "none", "train.max_steps": 2}
        ),
        progress=False,
        resume_from="split/checkpoint-2",
    )
    again = load_file(str(resumed.output_dir / "final" / "new_rows.safetensors"))
    saved = load_file(str(resumed.output_dir / "checkpoint-2" / "trained_rows.safetensors"))
    assert torch.equal(again["head_rows"], saved["head_rows"]) and torch.equal(again["rows"], saved["rows"])


def test_export_to_mlflow_logs_a_loadable_transformers_model(store, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = store["M"]
    result = CliRunner().invoke(main, ["export", run.run_id, "--to", "mlflow", "--registered-model-name", "wake"])
    assert result.exit_code == 0, result.output
    assert str(mlflow.MlflowClient().get_latest_versions("wake")[0].version) == "1"  # in the model registry
    uri = result.output.split("logged the full model: ")[1].split()[0]
    components = mlflow.transformers.load_model(uri, return_type="components")
    export(str(run.output_dir), str(tmp_path / "hf"), "hf")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert torch.equal(logits(components["model"], tokenizer)[0], logits(reference, tokenizer)[0])
    full = [
        m
        for m in mlflow.search_logged_models(experiment_ids=[run.experiment_id], output_format="list")
        if m.name == "wakelab-model"
    ]
    assert full and full[0].source_run_id == run.run_id
    assert mlflow.get_run(run.run_id).info.status == "FINISHED"  # linked, not reopened


def test_generate_decodes_new_words_with_their_spaces(runs):
    result = CliRunner().invoke(
        main, ["generate", str(runs["M"].output_dir), "The riverrun ran past the", "--max-new-tokens", "12"]
    )
    assert result.exit_code == 0, result.output
    text = result.stdout.strip()
    assert text.startswith("The riverrun ran past the ")
    assert any(
        f" {w}" in text[len("The riverrun ran past the") :]
        for w in (
            "riverrun",
            "glimmerous",
            "smirtle",
            "moonbrook",
            "thundersome",
            "wendelight",
            "crumbledown",
            "mistwhorl",
        )
    )


def test_generate_keeps_the_end_of_a_prompt_longer_than_the_context(runs):
    long_prompt = " ".join(["the river ran past the hill"] * 40)  # > 128 positions of the tiny model
    result = CliRunner().invoke(main, ["generate", str(runs["T"].output_dir), long_prompt, "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert "keeping its last 120 tokens" in result.stderr
    bad = CliRunner().invoke(main, ["generate", str(runs["T"].output_dir), "The river", "--max-new-tokens", "128"])
    assert bad.exit_code == 2 and "leaves no room for the prompt" in bad.stderr and "Traceback" not in bad.output


# -- bad input ------------------------------------------------------------------------------------------------------


def test_a_non_empty_destination_is_refused_unless_overwrite(runs, tmp_path):
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["export", str(runs["T"].output_dir), "--to", str(dest)])
    assert result.exit_code == 2 and "exists and is not empty; pass --overwrite" in result.stderr
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    export(str(runs["T"].output_dir), str(dest), "hf", overwrite=True)
    assert (dest / "model.safetensors").is_file() and not (dest / "keep.txt").exists()
    assert not list(tmp_path.glob(".partial-*"))


def test_a_failed_run_exports_its_latest_checkpoint_and_says_so(tiny_model, texts, tmp_path):
    plugin = raising_plugin(tmp_path, step=5)
    overrides = tiny_overrides(tiny_model, texts, **{"train.save_steps": 2, "train.eval_perplexity": False})
    overrides["plugins"] = [str(plugin)]
    with pytest.raises(RuntimeError, match="power cut"):
        engine.run(build_config(None, None, overrides), progress=False)
    run_dir = tmp_path / "out"
    notes = []
    result = export(str(run_dir), str(tmp_path / "hf"), "hf", say=notes.append)
    assert any("ended FAILED: exporting its latest complete checkpoint, checkpoint-4" in n for n in notes)
    assert json.loads((tmp_path / "hf" / "wakelab_export.json").read_text())["step"] == 4
    assert result.new_tokens == 8


def test_a_failed_run_without_checkpoint_has_nothing_to_export(tiny_model, texts, tmp_path):
    plugin = raising_plugin(tmp_path, step=2)
    overrides = tiny_overrides(tiny_model, texts, **{"train.eval_perplexity": False})
    overrides["plugins"] = [str(plugin)]
    with pytest.raises(RuntimeError, match="power cut"):
        engine.run(build_config(None, None, overrides), progress=False)
    with pytest.raises(ExportError, match="ended FAILED and left no complete checkpoint: nothing trained to export"):
        export(str(tmp_path / "out"), str(tmp_path / "hf"), "hf")
    assert not (tmp_path / "hf").exists()


def _copy_run(run_dir: Path, dest: Path, **model_keys) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = yaml.safe_load((dest / "config.yaml").read_text())
    config["model"].update(model_keys)
    (dest / "config.yaml").write_text(yaml.safe_dump(config))
    return dest


def test_a_base_that_moved_is_named_with_the_fix(runs, tmp_path, tiny_model):
    moved = _copy_run(runs["T"].output_dir, tmp_path / "run", name_or_path=str(tmp_path / "gone"))
    result = CliRunner().invoke(main, ["export", str(moved), "--to", str(tmp_path / "hf")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (
        f"no longer at {tmp_path / 'gone'} (model.name_or_path); put it back there or pass --base DIR" in result.stderr
    )
    assert not (tmp_path / "hf").exists()
    export(str(moved), str(tmp_path / "hf"), "hf", base=str(tiny_model))  # the fix works
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_a_different_base_is_refused(runs, tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other"  # same architecture and vocabulary, other weights
    shutil.copytree(tiny_model, other)
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.get_input_embeddings().weight[5] += 1
    model.save_pretrained(other)
    with pytest.raises(ModelError, match="is not the one the run was trained on"):
        export(str(runs["T"].output_dir), str(tmp_path / "hf"), "hf", base=str(other))
    bigger = tmp_path / "bigger"  # another vocabulary size
    shutil.copytree(tiny_model, bigger)
    tokenizer = AutoTokenizer.from_pretrained(bigger)
    tokenizer.add_tokens(["zzq", "qqz"])
    tokenizer.save_pretrained(bigger)
    with pytest.raises(ModelError, match="has 369 tokens but the run was trained on one with 367"):
        export(str(runs["T"].output_dir), str(tmp_path / "hf"), "hf", base=str(bigger))
    assert not (tmp_path / "hf").exists()


def test_a_run_id_or_path_that_is_not_a_run_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["export", "no-such-run", "--to", str(tmp_path / "x")])
    assert result.exit_code == 2 and "neither a folder nor an MLflow run id" in result.stderr
    with pytest.raises(WakelabError, match="not a wakelab run directory"):
        export(str(tmp_path), str(tmp_path / "x"), "hf")


def test_options_that_do_not_fit_are_refused_before_anything_is_written(runs, tmp_path):
    with pytest.raises(ExportError, match="this run's base is not 4-bit"):
        export(str(runs["T"].output_dir), str(tmp_path / "x"), "hf", quantized=True)
    with pytest.raises(ExportError, match="--quantized applies to --format hf"):
        export(str(runs["T"].output_dir), str(tmp_path / "x"), "peft", quantized=True)
    with pytest.raises(ExportError, match="use it with --to mlflow"):
        export(str(runs["T"].output_dir), str(tmp_path / "x"), "hf", registered_model_name="wake")
    assert not (tmp_path / "x").exists()


# -- decode round trip ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_as", ["word", "plain"])
def test_decode_round_trips_texts_with_new_words(tiny_model, texts, add_as):
    from transformers import AutoTokenizer

    from wakelab.vocab import expand_vocabulary, read_lexicon

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    num_base = len(tokenizer)
    expand_vocabulary(tokenizer, read_lexicon(texts["lexicon"]), add_as, "lexicon")
    tricky = "Theriverrun? The riverrun.\nmoonbrook  smirtle,\tglimmerous riverruns (riverrun) riverrun\n"
    for text in (texts["corpus"].read_text(), texts["heldout"].read_text(), tricky):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    ids = tokenizer("The riverrun rose", add_special_tokens=False)["input_ids"]
    assert sum(i >= num_base for i in ids) == 1
    assert tokenizer.decode(ids) == "The riverrun rose"  # not "Theriverrun rose"


def test_the_exported_tokenizer_round_trips_with_plain_autotokenizer(runs, tmp_path, texts):
    from transformers import AutoTokenizer

    export(str(runs["T"].output_dir), str(tmp_path / "hf"), "peft")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in (texts["heldout"].read_text(), make_text(7, 20)):
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_analyze_logs_text_samples_from_heldout_prompts_with_new_words(store):
    from conftest import COINED

    run = store["M"]
    result = CliRunner().invoke(
        main, ["analyze", str(run.output_dir), "--no-eval", "--sample-size", "50", "--samples", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "samples    2 continuations" in result.stdout
    rows = json.loads((run.output_dir / "analysis" / "final" / "samples.json").read_text())
    assert len(rows) == 2
    for row in rows:
        assert any(f" {w}" in row["prompt"] for w in COINED) and row["continuation"]
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.run_id, "analysis/final")}
    assert {"analysis/final/samples.json", "analysis/final/samples.txt"} <= logged


def test_a_4bit_run_exports_in_its_compute_dtype_or_kept_4bit(tiny_model, texts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    wide = tmp_path / "wide"  # bitsandbytes' CPU kernels need rows of at least one 64-value block
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(wide)
    tokenizer.save_pretrained(wide)
    overrides = tiny_overrides(
        wide, texts, **{"model.load_in_4bit": True, "train.max_steps": 2, "train.eval_perplexity": False}
    )
    result = engine.run(build_config(None, None, overrides), progress=False)
    notes = []
    export(str(result.output_dir), str(tmp_path / "bf16"), "hf", say=notes.append)
    assert any("4-bit nf4: exported unquantized in its compute dtype (bfloat16)" in n for n in notes)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert plain.dtype == torch.bfloat16 and not getattr(plain, "is_quantized", False)
    export(str(result.output_dir), str(tmp_path / "nf4"), "hf", quantized=True)
    kept = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")
    assert type(kept.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    state = load_trained(result.output_dir)
    from wakelab.quantized import keep_training_path

    # wakelab evaluates 4-bit layers on their training path (see wakelab.quantized); on AVX512-BF16 CPUs a plain
    # transformers load repacks them for bitsandbytes' inference kernel, which rounds differently. Same path, same
    # logits:
    keep_training_path(kept)
    assert torch.equal(logits(kept, tokenizer)[0], logits(state.model, tokenizer)[0])
