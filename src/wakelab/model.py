"""Loading the base model and tokenizer, optionally in 4-bit nf4, from a hub id or a local folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import ConfigError, ModelError
from .paths import cache_root, publishing


def resolve_source(cfg: ModelConfig) -> str:
    """A local folder or hub id; `demo` is the embedded base, converted once from the GGUF file a package ships."""
    if cfg.name_or_path == "demo":
        from .data.demo import ensure_demo_model

        return str(ensure_demo_model())
    return cfg.name_or_path


def _torch_dtype(name: str) -> Any:
    return "auto" if name == "auto" else getattr(torch, name)


def load_tokenizer(source: str, revision: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, source, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_source(cfg: ModelConfig) -> str | None:
    """Where the tokenizer loads from when it is not the model's own."""
    if cfg.tokenizer in ("offline-bpe", "gcide-bpe"):
        from .data import bpe

        build = bpe.build_gcide_bpe if cfg.tokenizer == "gcide-bpe" else bpe.build_offline_bpe
        return str(build(cfg.tokenizer_vocab_size))
    return cfg.tokenizer


def model_source(cfg: ModelConfig, seed: int = 0) -> str:
    """Where the weights load from: the config's folder or id, or a saved random-weights folder.

    Random weights (``from_config`` or ``architecture``) are saved once to a folder keyed by their config, so every
    loading path — dtype, 4-bit, checkpoints — is the same as for pretrained weights.
    """
    if cfg.architecture is not None:
        stored = cfg.compute_dtype if cfg.load_in_4bit else cfg.dtype
        return str(materialize_architecture(cfg.architecture, tokenizer_source(cfg), seed, stored))
    source = resolve_source(cfg)
    return str(materialize_from_config(source)) if cfg.from_config else source


def _strict_config_errors() -> tuple[type[Exception], ...]:
    """What recent configs raise for values that contradict each other (huggingface_hub's strict dataclasses, which
    older versions lack): the cause names the value."""
    from huggingface_hub import errors

    base = getattr(errors, "StrictDataclassError", None)
    return (base,) if base is not None else ()


def materialize_architecture(
    architecture: dict[str, Any], tokenizer_path: str | None, seed: int, dtype: str = "float32"
) -> Path:
    """A model folder with random weights for ``architecture`` (transformers config values) and its tokenizer.

    The weights are stored in ``dtype`` (the run's ``model.dtype``, or its 4-bit compute dtype), as a pretrained
    checkpoint is stored in the dtype it is used in: loading a float32 file as bfloat16 maps the whole file and
    converts it, which at Llama-3.2-1B's size held 4.6 GiB of file pages beside the 2.3 GiB model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(architecture)
    model_type = values.pop("model_type")
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    if tokenizer is not None:
        values.setdefault("vocab_size", len(tokenizer))
        values.setdefault("eos_token_id", tokenizer.eos_token_id)
        values.setdefault("bos_token_id", tokenizer.bos_token_id)
    try:
        config = AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError, *_strict_config_errors()) as exc:
        reason = exc.__cause__ if isinstance(exc, _strict_config_errors()) and exc.__cause__ else exc
        raise ConfigError(f"model.architecture: {str(reason).strip().splitlines()[0]}") from None
    stored = None if dtype in ("auto", "float32") else dtype  # float32 folders keep the key they always had
    blob = json.dumps(
        {"config": config.to_dict(), "tokenizer": tokenizer_path, "seed": seed} | ({"dtype": stored} if stored else {}),
        sort_keys=True,
        default=str,
    )
    folder = cache_root() / "architectures" / hashlib.sha256(blob.encode()).hexdigest()[:16]
    if not (folder / "config.json").exists():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        if stored:
            model = model.to(getattr(torch, stored))
        with publishing(folder) as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    return folder


def load_model(cfg: ModelConfig, source: str):
    """The base causal LM, as the config asks (dtype, or 4-bit nf4 with a compute dtype)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"revision": cfg.revision}
    if cfg.load_in_4bit:
        kwargs.update(quantization_kwargs(cfg))
    else:
        kwargs["dtype"] = _torch_dtype(cfg.dtype)
    model = _from_pretrained(AutoModelForCausalLM, source, **kwargs)
    if cfg.load_in_4bit:
        from .quantized import keep_training_path

        keep_training_path(model)  # evaluation on the training path: every width, every CPU, gradients intact
    return model


def load_model_config(source: str, revision: str | None = None):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, source, revision=revision)


def quantization_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(
            "model.load_in_4bit needs bitsandbytes: pip install -c constraints.txt 'bitsandbytes>=0.50'"
        ) from None
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, cfg.compute_dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        ),
        "dtype": compute,
        "device_map": {"": device},
    }


def _from_pretrained(cls, source: str, **kwargs):
    local = Path(source).expanduser()
    looks_local = local.exists() or source.startswith((".", "/", "~"))
    if looks_local and not local.is_dir():
        raise ModelError(f"model folder not found: {source} (set model.name_or_path to a folder or a hub id)")
    offline = False
    if not looks_local:
        from . import hub

        offline = not hub.reachable()
        if offline:
            kwargs["local_files_only"] = True  # the cache or a clear error now, not after ~30 s of retries
    try:
        return cls.from_pretrained(str(local) if looks_local else source, **kwargs)
    except (OSError, ValueError) as exc:
        if looks_local:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load {cls.__name__.removeprefix('Auto')} from {source}: {first}") from None
        if offline:
            from . import hub

            raise ModelError(
                f"cannot load '{source}': the Hugging Face hub ({hub.endpoint()}) cannot be reached and it is not in "
                f"the local cache; download it where there is network (`hf download {source} --local-dir DIR`) and "
                "set model.name_or_path=DIR"
            ) from None
        raise ModelError(
            f"cannot load '{source}' from the Hugging Face hub (offline or not found): download it where there is "
            f"network (`hf download {source} --local-dir DIR`) and set model.name_or_path=DIR"
        ) from None


def materialize_from_config(source: str) -> Path:
    """Random weights for the architecture in ``source``'s config.json, saved once so every loader path applies."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = _from_pretrained(AutoConfig, source)
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = cache_root() / "from-config" / digest
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        with publishing(folder) as tmp:
            model.save_pretrained(tmp)
            load_tokenizer(source).save_pretrained(tmp)
    return folder


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def check_seq_len(model_config, seq_len: int) -> None:
    limit = max_positions(model_config)
    if limit is not None and seq_len > limit:
        raise ConfigError(
            f"data.seq_len={seq_len} is beyond the model's maximum of {limit} positions; set data.seq_len<={limit}"
        )


def expand_embeddings(model, new_size: int) -> None:
    """Resize without transformers' mean-resizing (slow at 44k x 2048 and makes every new row the same)."""
    model.resize_token_embeddings(new_size, mean_resizing=False)
    model.config.vocab_size = new_size
