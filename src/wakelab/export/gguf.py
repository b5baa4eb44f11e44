"""A run's trained vocabulary as one GGUF file that llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs.

Going through ``wakelab export --format hf`` and llama.cpp's ``convert_hf_to_gguf.py`` loses added tokens or trips
the pre-tokenizer checksum once tokens are added (llama.cpp #15842, #8649), so wakelab writes the file itself:

- the merged model's embedding (base rows as they were, the trained rows after them) becomes ``token_embd``, and
  an untied head becomes ``output``;
- every added word is a ``USER_DEFINED`` token whose text is the word as it appears in text (`" riverrun"`, with
  its space): llama.cpp matches user-defined tokens in the raw text before pre-tokenizing, as transformers matches
  added tokens, so both give the one token;
- a base that came from a GGUF file (the demo) keeps that file's metadata (tokenizer, pre-tokenizer name, chat
  template, special ids) and its other tensors, dequantized and written in the chosen type; a base from
  safetensors (a folder or hub id) gets the same keys ``convert_hf_to_gguf.py`` writes for Llama and GPT-2.

The file is written next to its target and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WakelabError

#: --outtype -> (tensor type of 2-D weights, general.file_type). One-dimensional tensors (norms, biases) stay F32.
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
#: transformers model_type -> GGUF architecture this writer knows how to lay out.
ARCHITECTURES = {"llama": "llama", "gpt2": "gpt2"}
#: Written as general.* / wakelab.* keys: which run and step the file came from.
PROVENANCE_PREFIX = "wakelab."


class GgufExportError(WakelabError):
    """A run that cannot be written as GGUF as asked."""


def _types(outtype: str):
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    return {
        "f32": (Q.F32, F.ALL_F32),
        "f16": (Q.F16, F.MOSTLY_F16),
        "bf16": (Q.BF16, F.MOSTLY_BF16),
        "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
    }[outtype]


def check_target(dest: Path, overwrite: bool) -> None:
    """The target is a file path: refuse a folder, and an existing file unless ``overwrite``."""
    if dest.is_dir():
        raise GgufExportError(f"--to {dest} is a folder; --format gguf writes one file: give a path like {dest}.gguf")
    if dest.exists() and not overwrite:
        raise GgufExportError(f"--to {dest} exists; pass --overwrite to replace it, or choose another file")


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise GgufExportError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")


def architecture(model) -> str:
    """The GGUF architecture for a transformers model, or one line naming the supported ones."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        names = ", ".join(f"{k} ({v})" for k, v in ARCHITECTURES.items())
        raise GgufExportError(
            f"--format gguf does not write model_type {model_type!r}; it writes {names}: "
            "export --format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    return ARCHITECTURES[model_type]


# --- the vocabulary ---------------------------------------------------------------------------------------------


def added_tokens(tokenizer, num_base: int, n_vocab: int) -> tuple[list[str], list[int]]:
    """Texts and token types of ids ``num_base..n_vocab-1``: an added word is USER_DEFINED with its own text
    (``" riverrun"``, matched in raw text), a special token CONTROL, rows past the tokenizer UNUSED pads."""
    from gguf import TokenType

    decoder = tokenizer.added_tokens_decoder
    texts, types = [], []
    for i in range(num_base, n_vocab):
        added = decoder.get(i)
        if added is None:
            texts.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        texts.append(added.content)
        types.append(int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED))
    return texts, types


def unmatched_flags(tokenizer, num_base: int) -> str | None:
    """A note when added tokens carry single_word/lstrip/rstrip: GGUF has no field for them, so llama.cpp matches
    their text anywhere (inside longer words too) where transformers would not."""
    flagged = [
        t.content
        for i, t in tokenizer.added_tokens_decoder.items()
        if i >= num_base and (t.single_word or t.lstrip or t.rstrip)
    ]
    if not flagged:
        return None
    return (
        f"{len(flagged)} added tokens are single_word/lstrip/rstrip (first: {flagged[0]!r}); GGUF cannot say so, and "
        "llama.cpp matches their text anywhere, inside longer words too (docs/gguf.md)"
    )


def base_tokens(tokenizer, num_base: int) -> tuple[list[str], list[int]]:
    """A safetensors base's own tokens, as convert_hf_to_gguf.py writes them (byte-level BPE text)."""
    from gguf import TokenType

    vocab = tokenizer.get_vocab()
    reverse = {i: t for t, i in vocab.items() if i < num_base}
    decoder = tokenizer.added_tokens_decoder
    texts, types = [], []
    for i in range(num_base):
        if i not in reverse:
            texts.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif i in decoder:
            texts.append(decoder[i].content)
            types.append(int(TokenType.CONTROL if decoder[i].special else TokenType.USER_DEFINED))
        else:
            texts.append(reverse[i])
            types.append(int(TokenType.NORMAL))
    return texts, types


LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, read from its structure (not a checksum of
    its output, which added tokens change: llama.cpp #8649)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if (spec.get("model") or {}).get("type") != "BPE":
        raise GgufExportError(
            "--format gguf writes byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM); this base's tokenizer is "
            f"{(spec.get('model') or {}).get('type')}: export --format hf and use llama.cpp's convert_hf_to_gguf.py"
        )
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise GgufExportError(
        f"--format gguf does not recognise this tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}); it knows "
        "GPT-2's, Llama 3's and SmolLM's: export --format hf and use llama.cpp's convert_hf_to_gguf.py"
    )


def merges(tokenizer) -> list[str]:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


# --- the tensors ------------------------------------------------------------------------------------------------


def encode(name: str, array: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """A float tensor in the type it is written in: 1-D tensors and rows q8_0 cannot hold in F32/F16, as
    convert_hf_to_gguf.py does."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    qtype = _types(outtype)[0]
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim <= 1 or name.endswith("_norm.weight"):
        return array, Q.F32
    if qtype == Q.Q8_0 and array.shape[-1] % 32:
        qtype = Q.F16
    if qtype == Q.F32:
        return array, Q.F32
    if qtype == Q.F16:
        return array.astype(np.float16), Q.F16
    return quants.quantize(array, qtype), qtype


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Llama's q/k rows reordered for llama.cpp's rope (convert_hf_to_gguf.py's LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def hf_tensors(model, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """A transformers model's weights under their GGUF names, laid out as llama.cpp reads them."""
    import gguf

    cfg = model.config
    n_layers = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GPT2, n_layers)
    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue
        if tied and hf_name == "lm_head.weight":
            continue
        array = tensor.detach().float().cpu().numpy()
        if arch == "llama":
            if hf_name.endswith("q_proj.weight"):
                array = _permute(array, cfg.num_attention_heads, cfg.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                array = _permute(array, cfg.num_attention_heads, cfg.num_key_value_heads)
        elif hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            array = array.T
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GgufExportError(f"--format gguf: no GGUF name for the tensor {hf_name} of this {arch} model")
        yield name, array
    if arch == "llama" and (factors := llama3_rope_factors(cfg)) is not None:
        yield "rope_freqs.weight", factors


def _rope(cfg) -> dict[str, Any]:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    params = dict(params.get("full_attention", params))
    params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return params


def llama3_rope_factors(cfg) -> np.ndarray | None:
    """Llama 3.1+'s rope scaling as llama.cpp's rope_freqs tensor (convert_hf_to_gguf.py's generate_extra_tensors)."""
    params = _rope(cfg)
    if str(params.get("rope_type", "")).lower() != "llama3":
        return None
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (params["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _hparams(writer, model, arch: str) -> None:
    cfg = model.config
    if arch == "llama":
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_rope_freq_base(float(_rope(cfg)["rope_theta"]))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    else:
        writer.add_context_length(cfg.n_positions)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)


def _special_ids(writer, tokenizer) -> None:
    for attr, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    probe = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    writer.add_add_bos_token(bool(probe) and bos is not None and probe[0] == bos)
    writer.add_add_eos_token(bool(probe) and eos is not None and probe[-1] == eos and len(probe) > 1)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


# --- copying a GGUF base ----------------------------------------------------------------------------------------

#: Keys the writer sets itself or that this export replaces.
REPLACED = {"general.architecture", "general.file_type", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"}
DROPPED = {"tokenizer.ggml.scores"}


def copy_metadata(writer, reader, arch: str, n_vocab: int) -> None:
    """Every key of the base GGUF file but the ones this export replaces (the token list, types, vocab size,
    file type); a base with scores (SentencePiece) is refused earlier."""
    from gguf import GGUFValueType

    vocab_key = f"{arch}.vocab_size"
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in REPLACED or key in DROPPED or key == vocab_key:
            continue
        if key == "general.quantization_version":
            continue
        types = field.types
        if types[0] == GGUFValueType.ARRAY:
            if len(types) > 2:
                raise GgufExportError(f"the base GGUF's key {key} is a nested array, which this export cannot copy")
            writer.add_key_value(key, list(field.contents()), GGUFValueType.ARRAY, sub_type=types[1])
        else:
            writer.add_key_value(key, field.contents(), types[0])
    writer.add_vocab_size(n_vocab)


def gguf_tensors(reader) -> Iterator[tuple[str, np.ndarray]]:
    """The base GGUF's tensors, dequantized to float32 in llama.cpp's own layout (no permutation needed)."""
    from gguf import quants

    for tensor in reader.tensors:
        yield (
            tensor.name,
            quants.dequantize(tensor.data, tensor.tensor_type).reshape(
                [int(d) for d in reversed(tensor.shape.tolist())]
            ),
        )


def gguf_architecture(reader) -> str:
    arch = reader.fields["general.architecture"].contents()
    if arch not in ARCHITECTURES.values():
        raise GgufExportError(
            f"the base GGUF file is architecture {arch!r}; --format gguf writes {', '.join(ARCHITECTURES.values())}"
        )
    if reader.fields.get("tokenizer.ggml.model") is None or reader.fields["tokenizer.ggml.model"].contents() != "gpt2":
        raise GgufExportError(
            "the base GGUF file's vocabulary is not byte-level BPE (tokenizer.ggml.model gpt2); --format gguf "
            "writes those only"
        )
    return arch


# --- the file ---------------------------------------------------------------------------------------------------


@dataclass
class GgufResult:
    path: Path
    tensors: int
    n_vocab: int
    new_tokens: int
    outtype: str
    source: str


def write_gguf(
    model,
    tokenizer,
    num_base: int,
    dest: Path,
    *,
    outtype: str = "f16",
    base_gguf: Path | None = None,
    info: dict[str, Any] | None = None,
) -> GgufResult:
    """Write the merged ``model`` (expanded vocabulary, trained rows in place) with ``tokenizer`` to ``dest``.

    With ``base_gguf`` the metadata and the non-embedding tensors come from that file; otherwise from ``model``.
    """
    import gguf

    check_outtype(outtype)
    arch = architecture(model)
    embedding = model.get_input_embeddings().weight.detach().float().cpu().numpy()
    head = model.get_output_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False) or head is None
    n_vocab = embedding.shape[0]
    new_texts, new_types = added_tokens(tokenizer, num_base, n_vocab)
    reader = gguf.GGUFReader(base_gguf) if base_gguf is not None else None
    if reader is not None:
        arch = gguf_architecture(reader)
        base_texts = list(reader.fields["tokenizer.ggml.tokens"].contents())
        base_types = [int(t) for t in reader.fields["tokenizer.ggml.token_type"].contents()]
        if len(base_texts) != num_base:
            raise GgufExportError(
                f"the base GGUF file {base_gguf} has {len(base_texts):,} tokens but the run's base has {num_base:,}: "
                "it is another model"
            )
    else:
        pre = pre_tokenizer_name(tokenizer)
        base_texts, base_types = base_tokens(tokenizer, num_base)
    qtype, file_type = _types(outtype)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".partial-{dest.name}-{os.getpid()}")
    writer = gguf.GGUFWriter(str(partial), arch)
    count = 0
    try:
        if reader is not None:
            copy_metadata(writer, reader, arch, n_vocab)
            tensors = gguf_tensors(reader)
        else:
            writer.add_name(str(getattr(model.config, "_name_or_path", "") or "wakelab export"))
            _hparams(writer, model, arch)
            writer.add_vocab_size(n_vocab)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre)
            writer.add_token_merges(merges(tokenizer))
            _special_ids(writer, tokenizer)
            tensors = hf_tensors(model, arch)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_token_list(base_texts + new_texts)
        writer.add_token_types(base_types + new_types)
        for key, value in (info or {}).items():
            if value is not None:
                writer.add_string(PROVENANCE_PREFIX + key, value if isinstance(value, str) else json.dumps(value))
        for name, array in _with_trained_rows(tensors, embedding, None if tied else head, outtype):
            data, dtype = encode(name, array, outtype)
            writer.add_tensor(name, data, raw_dtype=dtype)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, dest)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return GgufResult(dest, count, n_vocab, n_vocab - num_base, outtype, "gguf" if reader is not None else "hf")


def _with_trained_rows(
    tensors: Iterator[tuple[str, np.ndarray]], embedding: np.ndarray, head, outtype: str
) -> Iterator[tuple[str, np.ndarray]]:
    """The base's tensors with ``token_embd`` (and an untied ``output``) replaced by the merged model's matrices."""
    seen_output = False
    for name, array in tensors:
        if name == "token_embd.weight":
            if array.shape[1] != embedding.shape[1] or array.shape[0] > embedding.shape[0]:
                raise GgufExportError(
                    f"the base's token_embd is {tuple(array.shape)}, the merged model's {tuple(embedding.shape)}: "
                    "another model"
                )
            yield name, embedding
        elif name == "output.weight":
            seen_output = True
            yield name, (embedding if head is None else head.weight.detach().float().cpu().numpy())
        else:
            yield name, array
    if head is not None and not seen_output:
        yield "output.weight", head.weight.detach().float().cpu().numpy()


def base_gguf_file(config) -> Path | None:
    """The GGUF file the run's base came from (the demo's), whose metadata and tensors the export keeps; None for
    a safetensors base."""
    if config.model.name_or_path == "demo":
        from ..data.demo import gguf_path

        return gguf_path()
    return None


def export_gguf(
    target: str,
    dest: str,
    *,
    overwrite: bool = False,
    base: str | None = None,
    outtype: str = "f16",
    registered_model_name: str | None = None,
    say: Callable[[str], None] = lambda _: None,
):
    """``wakelab export RUN --format gguf --to FILE|mlflow``: everything that can be wrong is found before the
    file is written; with ``mlflow`` the full model is logged and the GGUF file added to that logged model."""
    from ..run.merge import base_source, merged_model
    from .formats import ExportResult, expanded_tokenizer, find_source, provenance

    check_outtype(outtype)
    to_mlflow = dest == "mlflow"
    if registered_model_name and not to_mlflow:
        raise GgufExportError("--registered-model-name registers an MLflow model: use it with --to mlflow")
    out = None if to_mlflow else Path(dest)
    if out is not None:
        check_target(out, overwrite)
    source = find_source(target)
    if source.config.model.load_in_4bit:
        source.notes.append(
            f"the run's base is 4-bit nf4: written from its compute dtype ({source.config.model.compute_dtype})"
        )
    base_path = base_source(source.config, base)
    from_gguf = base_gguf_file(source.config)
    trained = source.rows()
    tokenizer = expanded_tokenizer(source, base_path)
    for note in source.notes:
        say(note)
    model = merged_model(source.config, trained, tokenizer, source=base_path)
    architecture(model)
    num_base = int(trained.base.get("num_base") or len(tokenizer) - int(trained.token_ids.numel()))
    if from_gguf is None:
        pre_tokenizer_name(tokenizer)
    if (note := unmatched_flags(tokenizer, num_base)) is not None:
        source.notes.append(note)
        say(note)
    info = {
        k: v
        for k, v in provenance(source, "gguf", {"outtype": outtype}).items()
        if k in ("run_id", "step", "add_as", "wakelab_version", "base", "outtype")
    }
    if out is not None:
        result = write_gguf(model, tokenizer, num_base, out, outtype=outtype, base_gguf=from_gguf, info=info)
        return ExportResult(out, "gguf", source.notes, result.new_tokens, result.n_vocab)
    import tempfile

    from ..run.logged_model import log_full_model

    uri = log_full_model(
        model,
        tokenizer,
        source.run_id,
        registered_model_name=registered_model_name,
        params=provenance(source, "mlflow", {"gguf": outtype}),
    )
    with tempfile.TemporaryDirectory(prefix="wakelab-gguf-") as tmp:
        path = Path(tmp) / GGUF_ARTIFACT_DIR / f"model-{outtype}.gguf"
        path.parent.mkdir()
        result = write_gguf(model, tokenizer, num_base, path, outtype=outtype, base_gguf=from_gguf, info=info)
        log_gguf_artifact(uri, Path(tmp))
    return ExportResult(uri, "mlflow", source.notes, result.new_tokens, result.n_vocab)


#: The folder inside a logged model's artifacts that holds the GGUF file.
GGUF_ARTIFACT_DIR = "gguf"


def log_gguf_artifact(model_uri: str, folder: Path) -> None:
    """Add ``folder``'s files to the logged model ``models:/<id>`` beside its transformers files (``folder`` holds
    ``gguf/``: the oldest MLflow wakelab supports, 3.9, has no ``artifact_path`` argument here)."""
    from ..tracking.runs import mlflow_client

    model_id = model_uri.removeprefix("models:/").split("/")[0]
    mlflow_client().log_model_artifacts(model_id, str(folder))
