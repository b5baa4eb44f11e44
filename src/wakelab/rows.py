"""Which embedding rows learn, and one way to read any row's value, gradient and Adam state.

Three strategies (``train.trainable``):

- ``tokens``: the base rows become a frozen tensor and the new rows one small trainable tensor. The input
  embedding looks rows up in either; the tied output head multiplies by both. Nothing rebuilds the full
  ``vocab x d`` matrix per forward (PEFT's TrainableTokens does), and only new rows carry Adam state.
- ``mask``: the P1 notebook's way. The whole matrix trains; a ``mask_grads`` plugin zeroes base-row gradients
  before clipping, and decoupled weight decay is applied to new rows only, so base rows stay bit-identical.
- ``full``: every parameter trains (Wordybird).

``RowAccess`` hides which tensor holds a row, so the recorder and the analyses read the same thing whatever the
strategy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class NewRowsEmbedding(nn.Module):
    """An input embedding split into frozen base rows and a trainable block of new rows."""

    def __init__(self, base_weight: torch.Tensor, new_weight: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        self.base_weight = nn.Parameter(base_weight, requires_grad=False)
        self.new_weight = nn.Parameter(new_weight, requires_grad=True)
        self.padding_idx = padding_idx
        #: Set when a tied head shares ``new_weight``: the lookup's gradient then comes sparse (the rows of the
        #: block's tokens only) and adds into the head's dense one, instead of a second new-rows-sized dense tensor
        #: per backward (345 MiB at P1). Untied, the sparse one would be the whole gradient, which AdamW refuses.
        self.sparse_new_grad = False

    @property
    def num_base(self) -> int:
        return self.base_weight.shape[0]

    @property
    def num_embeddings(self) -> int:
        return self.base_weight.shape[0] + self.new_weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base_weight.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """The full matrix, built on demand (for analysis and saving, never on the training path)."""
        return torch.cat([self.base_weight, self.new_weight.to(self.base_weight.dtype)], dim=0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        num_base = self.num_base
        is_new = input_ids >= num_base
        base = F.embedding(input_ids.clamp(max=num_base - 1), self.base_weight)
        new_ids = (input_ids - num_base).clamp(min=0)
        new = F.embedding(new_ids, self.new_weight, sparse=self.sparse_new_grad).to(base.dtype)
        return torch.where(is_new.unsqueeze(-1), new, base)

    def extra_repr(self) -> str:
        return f"base={tuple(self.base_weight.shape)}, new={tuple(self.new_weight.shape)} {self.new_weight.dtype}"


class NewRowsHead(nn.Module):
    """The output head over base and new rows: logits = [h @ base.T, h @ new.T], no full-matrix rebuild."""

    def __init__(
        self,
        base_weight: nn.Parameter,
        new_weight: nn.Parameter,
        bias: torch.Tensor | None = None,
        tied_to: NewRowsEmbedding | None = None,
    ):
        super().__init__()
        # Tied heads share the embedding's Parameters: plain attributes keep the module tree from listing them twice.
        # A tied head reads them from the embedding at each use: FSDP2 swaps the module's Parameters (sharded at
        # rest, gathered in the forward), so a reference kept here would go stale and keep the whole base alive.
        self._tied = (tied_to,) if tied_to is not None else ()
        self._own = () if tied_to is not None else (base_weight, new_weight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tied:
            return self._tied[0].base_weight, self._tied[0].new_weight
        return self._own

    @property
    def weight(self) -> torch.Tensor:
        base, new = self._weights
        return torch.cat([base, new.to(base.dtype)], dim=0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        base, new = self._weights
        logits = torch.cat([F.linear(hidden, base), F.linear(hidden, new.to(hidden.dtype))], dim=-1)
        return logits if self.bias is None else logits + self.bias


@dataclass(frozen=True)
class BaseRows:
    """The base rows as the checkpoint loaded them, kept from before the vocabulary grew.

    transformers maps a checkpoint's file into memory, so the loaded embedding costs no memory of its own until it is
    read. Growing the vocabulary copies every base row into a new matrix; the ``tokens`` split then copied them once
    more into its frozen tensor, while the file's pages stayed mapped: the base rows were held two or three times (1
    GiB each at P1's 128,256 x 2048 float32). Kept here, the split takes the loaded rows as they are.
    """

    embedding: torch.Tensor
    head: torch.Tensor | None = None  # an untied head's base rows; None when tied or headless

    @classmethod
    def of(cls, model: nn.Module, num_base: int) -> BaseRows | None:
        embedding = model.get_input_embeddings().weight
        if embedding.shape[0] < num_base:
            return None
        head = model.get_output_embeddings()
        untied = head is not None and head.weight is not embedding and head.weight.shape[0] >= num_base
        return cls(embedding.detach()[:num_base], head.weight.detach()[:num_base] if untied else None)

    def equal_to(self, weight: torch.Tensor, chunk: int = 8192) -> bool:
        """Whether ``weight``'s first rows are these, read a chunk at a time (no full-size comparison tensor)."""
        count = self.embedding.shape[0]
        if weight.shape[0] < count or weight.dtype != self.embedding.dtype:
            return False
        return all(
            torch.equal(self.embedding[start : start + chunk], weight[start : min(start + chunk, count)].detach())
            for start in range(0, count, chunk)
        )


class StackedRows:
    """Base rows and new rows read as one ``[vocab, d]`` float32 matrix without building it.

    A copy of the whole matrix is 1.35 GiB at P1 (172,451 x 2048 float32): ``analyze`` held one for its norms,
    isotropy and neighbours, the sweep comparison two per child. Slices and index tensors, which is how the
    neighbour search, the isotropy sample and the norms read it, come back as float32 tensors of just those rows.
    """

    def __init__(self, base: torch.Tensor, new: torch.Tensor):
        self.base, self.new = base, new
        self.shape = (base.shape[0] + new.shape[0], base.shape[1])

    def dim(self) -> int:
        return 2

    def __getitem__(self, index) -> torch.Tensor:
        n = self.base.shape[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step != 1:
                raise IndexError("StackedRows takes contiguous slices only")
            stop = max(start, stop)
            if stop <= n:
                return self.base[start:stop].float()
            if start >= n:
                return self.new[start - n : stop - n].float()
            return torch.cat([self.base[start:n].float(), self.new[: stop - n].float()])
        index = torch.as_tensor(index)
        out = torch.empty(*index.shape, self.shape[1])
        is_new = index >= n
        out[~is_new] = self.base[index[~is_new]].float()
        out[is_new] = self.new[index[is_new] - n].float()
        return out


def _frozen_base(part: torch.Tensor, held: torch.Tensor | None) -> torch.Tensor:
    """``held`` (the base rows as loaded) when it stands for ``part`` (same shape, dtype, device), else a copy."""
    part = part.detach()
    if held is not None and held.shape == part.shape and held.dtype == part.dtype and held.device == part.device:
        return held
    return part.clone()


@dataclass(frozen=True)
class _Segment:
    """Token ids [start, stop) live in ``param`` from row ``offset`` on."""

    start: int
    stop: int
    param: torch.Tensor
    offset: int = 0


class RowAccess:
    """Read values, gradients and Adam state of any rows, and know which rows train."""

    def __init__(self, strategy: str, num_base: int, num_total: int, segments: Sequence[_Segment]):
        self.strategy = strategy
        self.num_base = num_base
        self.num_total = num_total
        self._segments = tuple(segments)
        self._held_grads: dict[int, torch.Tensor] = {}

    def hold_grads(self) -> None:
        """Keep references to the gradients the optimizer is about to use.

        Trainer zeroes gradients (``set_to_none``) before ``on_step_end``; holding the tensors (no copy) lets
        ``grads()`` still return what the optimizer used until ``release_grads()``.
        """
        self._held_grads = {id(s.param): s.param.grad for s in self._segments if s.param.grad is not None}

    def release_grads(self) -> None:
        self._held_grads = {}

    def _grad_of(self, param: torch.Tensor) -> torch.Tensor:
        grad = self._held_grads.get(id(param), param.grad)
        return grad if grad is not None else torch.zeros_like(param)

    @property
    def new_ids(self) -> torch.Tensor:
        return torch.arange(self.num_base, self.num_total)

    @property
    def trained_ids(self) -> torch.Tensor:
        """Rows the optimizer is meant to move."""
        return torch.arange(0, self.num_total) if self.strategy == "full" else self.new_ids

    @property
    def dtype(self) -> torch.dtype:
        return self._segments[-1].param.dtype

    @property
    def dim(self) -> int:
        return self._segments[0].param.shape[1]

    def parameters(self) -> list[torch.Tensor]:
        """The tensors that hold rows and learn."""
        return [s.param for s in self._segments if s.param.requires_grad]

    @staticmethod
    def as_run(ids: range | torch.Tensor) -> range | None:
        """``ids`` as a ``range`` when they are one ascending run of consecutive ids, else None.

        A caller that asks for the same ids every step (the recorder) converts them once and passes the range, so
        ``share=True`` hands back views without comparing every id on every step.
        """
        if isinstance(ids, range):
            return ids if ids.step == 1 else None
        ids = torch.as_tensor(ids)
        if ids.ndim != 1 or len(ids) == 0:
            return None
        first = int(ids[0])
        consecutive = torch.equal(ids, torch.arange(first, first + len(ids), dtype=ids.dtype))
        return range(first, first + len(ids)) if consecutive else None

    def _run_of(self, ids: range | torch.Tensor) -> tuple[_Segment, int, int] | None:
        """The segment and its rows [a, b) when ``ids`` is one ascending run of consecutive ids inside one segment."""
        run = self.as_run(ids)
        if run is None or len(run) == 0:
            return None
        first, count = run.start, len(run)
        for seg in self._segments:
            if seg.start <= first and first + count <= seg.stop:
                a = first - seg.start + seg.offset
                return seg, a, a + count
        return None

    def _gather(self, ids: range | torch.Tensor | None, pick, share: bool = False) -> torch.Tensor:
        ids = range(self.num_total) if ids is None else ids
        pick = _whole(pick)
        if not isinstance(ids, range):
            ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        run = self._run_of(ids) if share else None
        if run is not None:
            seg, a, b = run
            return pick(seg.param)[a:b].detach()
        if isinstance(ids, range):
            ids = torch.arange(ids.start, ids.stop, ids.step)
        if len(self._segments) == 1 and self._segments[0].start == 0:
            seg = self._segments[0]
            source = pick(seg.param)
            return source.index_select(0, ids.to(source.device) + seg.offset).detach()
        parts = []
        out = None
        for seg in self._segments:
            inside = (ids >= seg.start) & (ids < seg.stop)
            if not inside.any():
                continue
            source = pick(seg.param)
            picked = source.index_select(0, (ids[inside] - seg.start + seg.offset).to(source.device)).detach()
            parts.append((inside, picked))
        for inside, picked in parts:
            if out is None:
                out = torch.zeros((len(ids), picked.shape[1]), dtype=picked.dtype, device=picked.device)
            out[inside.to(out.device)] = picked.to(out.dtype)
        if out is None:
            raise IndexError(f"token ids outside the vocabulary of {self.num_total}")
        return out

    def values(self, ids=None, *, share: bool = False) -> torch.Tensor:
        """The rows' current values (detached), in the dtype that holds them.

        ``share=True`` (here and in ``grads``/``optimizer_state``) returns a view of the tensor that holds the rows,
        not a copy, when ``ids`` is one ascending run inside one tensor (``all`` under ``mask``/``full``, ``new``
        under ``tokens``): copying all rows every step is what a recorder would otherwise pay twice. The view
        changes with the next optimizer step; copy it before then.
        """
        return self._gather(ids, lambda p: p, share)

    def stacked(self) -> StackedRows:
        """Every row, base then new, as one float32 matrix to read from (views of the tensors that hold them).

        For reading between optimizer steps (analyses): nothing is copied, so it changes when the rows do.
        """
        return StackedRows(
            self.values(range(self.num_base), share=True), self.values(range(self.num_base, self.num_total), share=True)
        )

    def grads(self, ids=None, *, share: bool = False) -> torch.Tensor:
        """The gradients the last optimizer step used (after masking and clipping); zeros for rows that do not learn."""
        return self._gather(ids, self._grad_of, share)

    def optimizer_state(
        self, optimizer: torch.optim.Optimizer | None, key: str, ids=None, *, share: bool = False
    ) -> torch.Tensor | None:
        """Adam's ``exp_avg`` / ``exp_avg_sq`` of the rows (zeros for rows without state), or None if none exists."""
        if optimizer is None or not any(key in optimizer.state.get(s.param, {}) for s in self._segments):
            return None

        def pick(param):
            state = optimizer.state.get(param, {})
            return state[key] if key in state else torch.zeros_like(param)

        return self._gather(ids, pick, share)

    def optimizer_step_count(self, optimizer: torch.optim.Optimizer | None) -> int:
        if optimizer is None:
            return 0
        for param in self.parameters():
            step = optimizer.state.get(param, {}).get("step")
            if step is not None:
                return int(step)
        return 0

    def grad_matrix(self) -> torch.Tensor | None:
        """The gradient of the full embedding matrix (``mask``/``full``), to edit in place; None for ``tokens``."""
        if self.strategy == "tokens":
            return None
        return self._segments[0].param.grad

    def decay_new_rows(self, lr: float, weight_decay: float) -> None:
        """AdamW's decoupled decay, applied to new rows only (``mask``: the matrix sits in a no-decay group)."""
        if self.strategy != "mask" or weight_decay == 0:
            return
        weight = self._segments[0].param
        with torch.no_grad():
            weight[self.num_base :].mul_(1 - lr * weight_decay)

    def trained_rows(self) -> dict[str, torch.Tensor]:
        """The rows a checkpoint must keep, with their token ids."""
        ids = self.trained_ids
        return {"token_ids": ids, "rows": self.values(ids).contiguous().cpu()}

    def load_rows(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Write rows back (restore from a checkpoint or an earlier phase)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        with torch.no_grad():
            for seg in self._segments:
                inside = (ids >= seg.start) & (ids < seg.stop)
                if inside.any():
                    target = ids[inside] - seg.start + seg.offset
                    seg.param[target.to(seg.param.device)] = rows[inside].to(seg.param.device, seg.param.dtype)


def _whole(pick):
    """``pick`` that refuses a sharded (FSDP2 DTensor) tensor: only the main process reads the base rows whole."""

    def whole(param):
        value = pick(param)
        if hasattr(value, "full_tensor"):
            raise RuntimeError(
                "the base rows are sharded over the processes (train.distributed=fsdp): read them on the main "
                "process (is_main_process), which holds them whole"
            )
        return value

    return whole


def _resolve_dtype(name: str, fallback: torch.dtype) -> torch.dtype:
    return fallback if name == "auto" else getattr(torch, name)


def setup_trainable_rows(
    model: nn.Module, num_base: int, strategy: str, rows_dtype: str = "auto", base_rows: BaseRows | None = None
) -> RowAccess:
    """Freeze what must not learn and return the accessor for the rows that do.

    The vocabulary is already expanded (embedding and head resized). For ``tokens`` the embedding and head are
    replaced by the split modules, whose frozen base rows are ``base_rows`` (the rows as loaded, no copy) when given,
    else a copy of the resized matrix's; for ``mask`` only the embedding matrix keeps ``requires_grad``.
    """
    embedding = model.get_input_embeddings()
    num_total = embedding.weight.shape[0]
    if strategy == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return RowAccess(strategy, num_base, num_total, [_Segment(0, num_total, embedding.weight)])

    for param in model.parameters():
        param.requires_grad_(False)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    if strategy == "mask":
        embedding.weight.requires_grad_(True)
        if head is not None and not tied:
            head.weight.requires_grad_(True)
        return RowAccess(strategy, num_base, num_total, [_Segment(0, num_total, embedding.weight)])

    weight = embedding.weight.detach()
    dtype = _resolve_dtype(rows_dtype, weight.dtype)
    new_embedding = NewRowsEmbedding(
        _frozen_base(weight[:num_base], base_rows and base_rows.embedding),
        weight[num_base:].clone().to(dtype),
        getattr(embedding, "padding_idx", None),
    )
    model.set_input_embeddings(new_embedding)
    if head is not None:
        tied_to = new_embedding if tied else None
        if tied:
            base_w, new_w = new_embedding.base_weight, new_embedding.new_weight
            new_embedding.sparse_new_grad = True
        else:
            head_weight = head.weight.detach()
            base_w = _frozen_base(head_weight[:num_base], base_rows and base_rows.head)
            base_w = nn.Parameter(base_w, requires_grad=False)
            new_w = nn.Parameter(head_weight[num_base:].clone().to(dtype), requires_grad=True)
        new_head = NewRowsHead(base_w, new_w, getattr(head, "bias", None), tied_to)
        if not tied:
            new_head.register_parameter("new_weight", new_w)
        model.set_output_embeddings(new_head)
    # Loss functions read the vocabulary size from the config; the split modules keep it.
    return RowAccess(
        strategy,
        num_base,
        num_total,
        [_Segment(0, num_base, new_embedding.base_weight), _Segment(num_base, num_total, new_embedding.new_weight)],
    )
