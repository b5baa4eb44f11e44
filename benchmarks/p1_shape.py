"""What the P1-proportion benchmarks (`tokens_vs_mask.py`, `full_width.py`) share: the vocabulary split, random
blocks with a share of new ids, the quiet engine wiring of ``WakelabTrainer``, and the process's memory figures.

Imported by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path``).
"""

from __future__ import annotations

NUM_BASE = 128_256
NUM_NEW = 44_195


def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def random_blocks(count: int, seq_len: int, new_share: float, seed: int = 1):
    """``count`` blocks of random base ids with about ``new_share`` of them new ids: (ids, BlockDataset)."""
    import numpy as np
    import torch

    from wakelab.data import BlockDataset

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, NUM_BASE, (count, seq_len), generator=gen)
    is_new = torch.rand((count, seq_len), generator=gen) < new_share
    ids[is_new] = torch.randint(NUM_BASE, NUM_BASE + NUM_NEW, (int(is_new.sum()),), generator=gen)
    return ids, BlockDataset(ids.numpy().astype(np.int64))


def quiet_bridge(trainer_ref, output_dir: str):
    """The engine's ``HookBridge`` with nothing logged: the hooks run as in ``wakelab run``, without MLflow."""
    from wakelab.trainer import HookBridge

    return HookBridge(
        trainer_ref=trainer_ref,
        on_start=lambda optimizer: None,
        log_metrics=lambda metrics, step: None,
        extra_metrics=lambda: {},
        output_dir=output_dir,
        run_id=None,
    )


def adam_state(trainer) -> tuple[int, int]:
    """(bytes, parameter tensors) of Adam's ``exp_avg`` + ``exp_avg_sq`` in the trainer's optimizer."""
    optimizer = trainer.optimizer
    while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer wraps the torch one
        optimizer = optimizer.optimizer
    state_bytes = state_tensors = 0
    for state in optimizer.state.values():
        keys = [k for k in ("exp_avg", "exp_avg_sq") if k in state]
        state_bytes += sum(state[k].numel() * state[k].element_size() for k in keys)
        state_tensors += bool(keys)
    return state_bytes, state_tensors
