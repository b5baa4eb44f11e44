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

``full``: the decoder layers and the final norm are sharded *and* train (FSDP2 reduce-scatters their gradients,
Adam's state is sharded with them); the embedding and the head stay whole, as the new rows do under ``tokens``, so
RowAccess and the plugins read them as under DDP. A checkpoint gathers the weights (``model.safetensors``) and
Adam's state (``optimizer.pt``, by parameter name) whole, so it loads into any number of processes, or one
(:func:`save_whole_model`, :func:`save_whole_optimizer` and their ``load_`` pairs, called from ``WakelabTrainer``).

``mask`` is refused (config validation): its ``mask_grads`` hook needs the whole embedding gradient, which FSDP
shards.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import ConfigError
from ..logs import is_main_process, log, warn
from ..rows import NewRowsEmbedding, RowAccess, _Segment


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
    require_trainer_support()
    return True


def require_trainer_support() -> None:
    """Trainer takes a model its caller sharded only since it syncs replicated trainable tensors itself
    (``Trainer._sync_replicated_trainable_parameters``, read through ``is_distributed_loading_by_transformers``); an
    older one would wrap the shards in DDP. One line naming the version, before any rank trains."""
    import transformers
    from transformers import Trainer

    if not hasattr(Trainer, "_sync_replicated_trainable_parameters"):
        raise ConfigError(
            f"train.distributed=fsdp needs a transformers whose Trainer takes a model sharded by its caller "
            f"(Trainer._sync_replicated_trainable_parameters); this one is {transformers.__version__}: upgrade "
            "transformers, or use train.distributed=ddp"
        )


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

    if rows.strategy == "mask":  # refused by the config already; a caller that skipped it gets the same answer
        raise ConfigError("train.distributed=fsdp does not support train.trainable=mask; use train.trainable=tokens")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (world_size(),))
    # ``tokens``: the new rows (and an untied head's); ``full``: the whole embedding and head, which RowAccess reads.
    keep_whole = set(rows.parameters())
    head = model.get_output_embeddings()
    keep_whole |= {p for p in (head.parameters() if head is not None else ()) if p.requires_grad}
    embedding = model.get_input_embeddings()
    # The main process reads the frozen base rows from a private memory map (plugins: the trajectory's basis, a
    # recorder's base rows): no collective, and no page in memory until a plugin reads it.
    split = isinstance(embedding, NewRowsEmbedding)
    base_rows = _mapped_copy(embedding.base_weight) if split and is_main_process() else None
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=keep_whole)
    with torch.no_grad():  # fully_shard moved what it shards to the mesh's device; the rows it left out go too
        for param in keep_whole:
            param.data = param.data.to(mesh.device_type)
    sharded = sum(p.numel() for p in model.parameters() if p not in keep_whole)
    log(
        f"FSDP2: {len(decoder_layers(model))} decoder layers and the rest of the base sharded over {world_size()} "
        f"processes ({sharded:,} parameters, 1/{world_size()} each); "
        + ("the new rows" if split else "the embedding and the head")
        + " stay whole on every process"
    )
    if not split:
        return rows  # ``full``: the one segment is the whole embedding, left out of the sharding
    segments = [
        _Segment(0, rows.num_base, base_rows if base_rows is not None else embedding.base_weight),
        _Segment(rows.num_base, rows.num_total, embedding.new_weight),
    ]
    return RowAccess(rows.strategy, rows.num_base, rows.num_total, segments)


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


def save_whole_model(trainer, output_dir: str | None) -> None:
    """``full``: the model's shards gathered (every process takes part), written whole by the main process."""
    from pathlib import Path

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not trainer.args.should_save:
        return
    out = Path(output_dir or trainer.args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(out, state_dict=state)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(out)


def load_whole_model(trainer, checkpoint: str) -> None:
    """``full``: a checkpoint's whole weights into the shards (every process reads the file and keeps its part)."""
    from pathlib import Path

    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = load_file(str(Path(checkpoint) / "model.safetensors"))
    # A tied head is saved once, under the embedding's name: strict=False lets it follow the embedding.
    set_model_state_dict(trainer.model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def _torch_optimizer(trainer):
    optimizer = trainer.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer  # accelerate's wrapper
    return optimizer


def save_whole_optimizer(trainer, output_dir: str) -> None:
    """``full``: Adam's state gathered whole (every process takes part) over the main process's own shards, which
    Trainer has just written into ``optimizer.pt``: the file any number of processes resume from."""
    from pathlib import Path

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(trainer.model, _torch_optimizer(trainer), options=options)
    if trainer.args.should_save:
        torch.save(state, Path(output_dir) / "optimizer.pt")


def load_whole_optimizer(trainer, checkpoint: str) -> None:
    """``full``: ``optimizer.pt`` (whole, by parameter name) into this process's shards of Adam's state."""
    from pathlib import Path

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(Path(checkpoint) / "optimizer.pt", map_location="cpu", weights_only=True)
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(trainer.model, _torch_optimizer(trainer), state, options=options)
    schedule = torch.load(Path(checkpoint) / "scheduler.pt", weights_only=True)
    trainer.lr_scheduler.load_state_dict(schedule)


def hand_to_trainer(trainer) -> None:
    """Tell Trainer the model reduces its own parameters (see the module's docstring)."""
    trainer.is_distributed_loading_by_transformers = True
