"""``train.distributed=fsdp``: the frozen base sharded over torchrun's processes with FSDP2; the learning rows whole.

Under DDP every process holds the whole model. Here ``fully_shard`` (``torch.distributed.fsdp``, per-parameter
DTensor sharding) splits every decoder layer, and then the rest of the model (the base embedding rows, the final norm,
an untied head), across the processes: each holds 1/N of the base between steps and gathers one unit at a time to
run it. The new rows (``tokens``: the small trainable tensors) are left out of the sharding (``ignored_params``): each
process keeps them whole, and their gradient is averaged over the processes at the end of each step, as DDP would.
So the recorder, the trajectory, Sentry's mirrors, checkpoints, the final rows and the logged model read the same
whole rows as under DDP, on rank 0 alone and without a collective, and a checkpoint holds the whole optimizer state.

Why ``fully_shard`` is applied here and not through Trainer's ``fsdp``/``fsdp_config`` settings: accelerate turns
its FSDP plugin on only for accelerator devices (its ``AcceleratorState`` leaves ``MULTI_CPU`` as plain DDP), so on
CPU with gloo those settings would silently train DDP; and transformers' own load-time sharding
(``from_pretrained(distributed_config=...)``) shards before wakelab resizes the vocabulary and fills the new rows, and
refuses checkpoints that keep the optimizer state. Resize and init come first, sharding last, here.

What Trainer needs to know it reads from two public places: ``TrainingArguments.place_model_on_device`` (False:
:func:`training_arguments`), so it does not move the shards, and ``Trainer.is_distributed_loading_by_transformers``,
the attribute by which transformers marks a model that already reduces its own parameters (:func:`hand_to_trainer`),
so it does not wrap the model in DDP (whose wrap refuses DTensor parameters), broadcasts the replicated trainable
tensors from rank 0 once and averages their gradients after each step's backward. ``tests/test_sharding.py`` fails
by name if transformers stops reading the latter. Tested on CPU with gloo; the CUDA path (nccl, the mesh on the GPU,
the whole rows moved there) is the same code, not yet run on a GPU.

``mask`` is refused (config validation): its ``mask_grads`` hook needs the whole embedding gradient, which FSDP
shards. ``full`` is refused too: every parameter would be a sharded trainable DTensor, and Trainer's checkpoint of
such an optimizer needs FSDP's distributed-checkpoint path, which this manual sharding does not take.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .errors import ConfigError
from .logs import log, warn
from .rows import NewRowsEmbedding, RowAccess, _Segment


def world_size() -> int:
    """The number of processes torchrun started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def wanted(config) -> bool:
    """Whether this run shards: ``train.distributed=fsdp`` under a launcher; alone, a warning that nothing changes."""
    if config.train.distributed != "fsdp":
        return False
    if world_size() < 2:
        warn(
            "train.distributed=fsdp with a single process changes nothing (the whole model is on this process); "
            "launch with torchrun --nproc_per_node N to shard it"
        )
        return False
    return True


def describe_batch(config) -> str:
    """Trainer's rule for the batch, in one line: ``train.batch_size`` is per process."""
    t, n = config.train, world_size()
    return (
        f"{n} processes: {t.batch_size} blocks per process x {n} x {t.grad_accum} accumulation = "
        f"{t.batch_size * n * t.grad_accum} blocks per optimizer step (train.batch_size is per process, Trainer's "
        "rule: for the global batch of a single-process run with batch_size B, set B / N)"
    )


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, each its own FSDP unit (the decoder's ``layers``, as every HF causal LM names them)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ConfigError(
            f"train.distributed=fsdp: {type(model).__name__} has no decoder `layers` to shard; use "
            "train.distributed=ddp"
        )
    return list(layers)


def shard(model: nn.Module, rows: RowAccess) -> RowAccess:
    """``fully_shard`` every decoder layer, then the model (the rest of the base); the learning rows stay whole.

    Returns the ``RowAccess`` re-pointed at the sharded tensors: FSDP2 replaces each sharded parameter with a new
    DTensor one, so the old references would keep the whole base alive (and stale).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if rows.strategy != "tokens":
        raise ConfigError(f"train.distributed=fsdp supports train.trainable=tokens, not {rows.strategy}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (world_size(),))
    keep_whole = set(rows.parameters())  # the new rows, and an untied head's new rows
    head = model.get_output_embeddings()
    keep_whole |= {p for p in (head.parameters() if head is not None else ()) if p.requires_grad}
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, NewRowsEmbedding):
        raise ConfigError("train.distributed=fsdp needs the split embedding of train.trainable=tokens")
    # The main process reads the frozen base rows from a private memory map (plugins: the trajectory's basis, a
    # recorder's base rows): no collective, and no page in memory until a plugin reads it.
    base_rows = _mapped_copy(embedding.base_weight) if _rank() == 0 else None
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=keep_whole)
    with torch.no_grad():  # fully_shard moved what it shards to the mesh's device; the rows it left out go too
        for param in keep_whole:
            param.data = param.data.to(mesh.device_type)
    segments = [
        _Segment(0, rows.num_base, base_rows if base_rows is not None else embedding.base_weight),
        _Segment(rows.num_base, rows.num_total, embedding.new_weight),
    ]
    sharded = sum(p.numel() for p in model.parameters() if p not in keep_whole)
    log(
        f"FSDP2: {len(decoder_layers(model))} decoder layers and the rest of the base sharded over {world_size()} "
        f"processes ({sharded:,} base parameters, 1/{world_size()} each); the new rows stay whole on every process"
    )
    return RowAccess(rows.strategy, rows.num_base, rows.num_total, segments)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _mapped_copy(weight: torch.Tensor, chunk_rows: int = 8192) -> torch.Tensor:
    """``weight`` written to a temporary file (removed at once; the mapping keeps it) and mapped back read-only."""
    import tempfile

    weight = weight.detach()
    fd, name = tempfile.mkstemp(prefix="wakelab-base-rows-", suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as handle:
            for start in range(0, weight.shape[0], chunk_rows):  # a chunk at a time: never a second whole copy
                chunk = weight[start : start + chunk_rows].contiguous().cpu()
                handle.write(chunk.view(torch.uint8).numpy().tobytes())
        mapped = torch.from_file(name, shared=False, size=weight.numel(), dtype=weight.dtype)
    finally:
        os.unlink(name)
    return mapped.view(weight.shape)


def training_arguments():
    """``TrainingArguments`` whose ``place_model_on_device`` (the property transformers leaves for integrations to
    override) is False: FSDP2 put the shards on the device, and ``.to()`` on them raises."""
    from transformers import TrainingArguments

    class ShardedArguments(TrainingArguments):
        @property
        def place_model_on_device(self) -> bool:
            return False

    return ShardedArguments


def hand_to_trainer(trainer) -> None:
    """Tell Trainer the model reduces its own parameters (see the module's docstring)."""
    trainer.is_distributed_loading_by_transformers = True
