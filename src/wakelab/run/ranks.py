"""One error for all ranks: under torchrun, a pre-flight failure on any process stops every process at once.

Before training, the ranks of a torchrun job meet at a few points (rank 0 checks the inputs and makes the output
folder first, the others then check theirs, then rank 0 opens the MLflow run). A rank that fails between two such
points used to leave the others waiting at the next one until the process group's timeout (many minutes), each
printing nothing. Here every meeting point is an exchange of outcomes (:func:`agree`): a rank that fails brings its
error to the point the others wait at (:func:`one_error_for_all` does that on the way out), and every rank raises the
same one-line error, before rank 0 opens any MLflow run. Once training starts (:func:`agree` with ``last=True``) a
failure is Trainer's and torchrun's to handle. In a single process all of this is a no-op.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import WakelabError


class RankError(WakelabError):
    """Another rank's pre-flight failure, raised on this rank with the same message (and exit status)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class _Agreement:
    open: bool = True  # still before the last meeting point: a failure here must be brought to the others


_stack: list[_Agreement] = []


def _group():
    import torch

    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _outcome(error: BaseException | None) -> tuple[str, int] | None:
    """What the other ranks need of an error: its one line and exit status."""
    if error is None:
        return None
    text = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, WakelabError):
        return text, getattr(error, "exit_code", 2)
    return f"{type(error).__name__} before training: {text}" if text else type(error).__name__, 1


def _exchange(error: BaseException | None) -> None:
    """Every rank's outcome to every rank; raise the first failing rank's error on the ranks that did not fail."""
    dist = _group()
    if dist is None:
        return
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, _outcome(error))
    if error is not None:
        return  # the failing rank raises its own error (with its traceback when it is a bug)
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            message, exit_code = outcome
            if not isinstance(message, str):
                message = str(message)
            raise RankError(message if exit_code == 2 else f"rank {rank}: {message}", exit_code)


def join() -> int:
    """This process's global rank. Under a launcher (WORLD_SIZE > 1) join the process group now, so the pre-flight
    work can meet at :func:`agree`; Trainer (through accelerate) then reuses the group. gloo on CPU, nccl on CUDA.
    Joining twice is harmless, so the CLI joins before it reads the config (a bad config is then every rank's error).
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("cuda:nccl,cpu:gloo")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank()


def agree(last: bool = False) -> None:
    """A meeting point of every rank before training (all must call it): raises another rank's failure here.

    ``last``: the final one before training; after it a failure is no longer brought to the other ranks.
    """
    token = _stack[-1] if _stack else None
    if token is not None and not token.open:
        return
    if last:
        for outer in _stack:  # the CLI's and the engine's: once training starts, no rank waits for another's error
            outer.open = False
    _exchange(None)


def one_error_for_all(fn):
    """Wrap a rank's run: a failure before the last meeting point is handed to the other ranks on the way out."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        token = _Agreement()
        _stack.append(token)
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            if token.open and not isinstance(exc, RankError):
                token.open = False
                try:
                    _exchange(exc)
                except Exception:  # noqa: BLE001 - the group itself broke: this rank's own error says more
                    pass
            raise
        finally:
            _stack.remove(token)

    return wrapper
