"""Reading an embedding matrix saved by an earlier phase (P1's step-700 reload), safely.

``.pt`` files are read with ``weights_only=True``: a pickle from elsewhere never runs code here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError


def load_embedding_matrix(path: str | Path) -> tuple[torch.Tensor, dict[str, int] | None, dict[str, Any]]:
    """The matrix, its token->id map when the file carries one, and what is known of its source run."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"init.from_embeddings: file not found: {path} (give the phase-1 embedding file, or set "
            "init.from_embeddings=null to start from the init)"
        )
    meta: dict[str, Any] = {}
    token_ids = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            meta = dict(handle.metadata() or {})
            key = next((k for k in ("embeddings", "weight", "embed_tokens.weight") if k in keys), None)
            if key is None and len(keys) == 1:
                key = keys[0]
            if key is None:
                raise ConfigError(f"init.from_embeddings {path}: no 'embeddings' or 'weight' tensor among {keys}")
            matrix = handle.get_tensor(key)
    elif path.suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - weights_only refuses anything that is not plain tensors
            raise ConfigError(
                f"init.from_embeddings {path}: not a plain tensor file ({type(exc).__name__}); wakelab never unpickles "
                "arbitrary objects: save the matrix with torch.save(tensor) or as safetensors"
            ) from None
        if isinstance(obj, dict):
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            key = next((k for k in ("embeddings", "weight", "embed_tokens.weight") if k in tensors), None)
            if key is None and len(tensors) == 1:
                key = next(iter(tensors))
            if key is None:
                raise ConfigError(f"init.from_embeddings {path}: no 'embeddings' tensor among {sorted(tensors)}")
            matrix = tensors[key]
            if isinstance(obj.get("token_to_id"), dict):
                token_ids = {str(k): int(v) for k, v in obj["token_to_id"].items()}
        elif isinstance(obj, torch.Tensor):
            matrix = obj
        else:
            raise ConfigError(f"init.from_embeddings {path}: holds a {type(obj).__name__}, not a tensor")
    else:
        raise ConfigError(f"init.from_embeddings {path}: use a .safetensors or .pt file")
    if matrix.dim() != 2:
        raise ConfigError(f"init.from_embeddings {path}: expected a 2-D [vocab, d] matrix, got {tuple(matrix.shape)}")
    return matrix, token_ids, meta
