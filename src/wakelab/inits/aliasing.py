"""The base model reading a new token, against the same model reading the word spelled out in its base sub-tokens.

Token distillation (Dobler et al., "AweDist", arXiv 2505.20133) learns a new word's input row so that the model's
hidden states after reading the one new token match those after reading the word's original sub-tokens. The same
comparison, on held-out text, measures how far any init leaves the model from reading the word as it read it
before the word was added. This module holds that comparison, shared by the ``distill`` init and the engine's
held-out measure:

* ``alias_pair``: one text twice. The *student* reads the kept new tokens as themselves (any other new token spelled
  out); the *teacher* reads every new token spelled out. Positions from the first kept token on are paired: a
  kept token with the last of its pieces (where the teacher has read the whole word), every other token with
  itself. Positions before it are the same in both and say nothing.
* ``alias_batch``: pairs padded into tensors, with the paired positions as flat indices.
* ``alias_distance``: the mean squared difference of the two readings' hidden states at one layer, over the paired
  positions (float32). Only the backbone runs (no vocabulary logits), so a batch costs two forward passes.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass
class AliasPair:
    """One text read both ways, and which student position is compared with which teacher position."""

    student: list[int]
    teacher: list[int]
    student_at: list[int]
    teacher_at: list[int]


def alias_pair(
    ids: Sequence[int], pieces: Mapping[int, Sequence[int]], keep: Container[int], max_len: int
) -> AliasPair | None:
    """The two readings of ``ids`` (token ids of the expanded vocabulary).

    ``pieces`` maps a new token to the base ids that spell it (tokens it does not name are read as themselves by
    both); ``keep`` holds the new tokens the student reads as themselves. Both readings stop before either would
    pass ``max_len`` tokens (the teacher's is the longer one). None when no kept token is left to compare.
    """
    student: list[int] = []
    teacher: list[int] = []
    student_at: list[int] = []
    teacher_at: list[int] = []
    seen = False
    for token in ids:
        token = int(token)
        spelled = pieces.get(token)
        kept = spelled is not None and token in keep
        as_teacher = list(spelled) if spelled is not None else [token]
        as_student = [token] if kept or spelled is None else as_teacher
        if len(teacher) + len(as_teacher) > max_len or len(student) + len(as_student) > max_len:
            break
        seen = seen or kept
        if kept:
            student_at.append(len(student))
            teacher_at.append(len(teacher) + len(as_teacher) - 1)
        elif seen:
            student_at.extend(range(len(student), len(student) + len(as_student)))
            teacher_at.extend(range(len(teacher), len(teacher) + len(as_teacher)))
        student += as_student
        teacher += as_teacher
    if not student_at:
        return None
    return AliasPair(student, teacher, student_at, teacher_at)


@dataclass
class AliasBatch:
    """Pairs padded into ``[batch, length]`` tensors; ``*_at`` index the flattened ``[batch * length]`` positions."""

    student: torch.Tensor
    teacher: torch.Tensor
    student_at: torch.Tensor
    teacher_at: torch.Tensor

    def to(self, device) -> AliasBatch:
        return AliasBatch(*(t.to(device) for t in (self.student, self.teacher, self.student_at, self.teacher_at)))


def alias_batch(pairs: Sequence[AliasPair], pad_id: int = 0) -> AliasBatch:
    """Right-padded tensors (causal attention: the padding never reaches a compared position)."""
    s_len = max(len(p.student) for p in pairs)
    t_len = max(len(p.teacher) for p in pairs)
    student = torch.full((len(pairs), s_len), pad_id, dtype=torch.long)
    teacher = torch.full((len(pairs), t_len), pad_id, dtype=torch.long)
    s_at, t_at = [], []
    for row, pair in enumerate(pairs):
        student[row, : len(pair.student)] = torch.tensor(pair.student)
        teacher[row, : len(pair.teacher)] = torch.tensor(pair.teacher)
        s_at += [row * s_len + i for i in pair.student_at]
        t_at += [row * t_len + i for i in pair.teacher_at]
    return AliasBatch(student, teacher, torch.tensor(s_at), torch.tensor(t_at))


def layer_count(model) -> int:
    """Transformer blocks of ``model``, or of a model config (hidden states 1..count; 0 is the embedding layer)."""
    config = getattr(model, "config", model)
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


def _states(model, layer: int, **inputs) -> torch.Tensor:
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), model)
    out = backbone(**inputs, output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer]


def alias_distance(
    model, batch: AliasBatch, layer: int = -1, student_embeds: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared difference between the student's and the teacher's hidden states at ``layer`` (an index into
    the hidden states: 1..L, or -1 for the last) over the paired positions; a float32 scalar.

    ``student_embeds`` (``[batch, length, d]``) replaces the student's input embeddings, so a caller can put
    trainable rows in and get gradients for them; the teacher always runs without gradients.
    """
    with torch.no_grad():
        teacher = _states(model, layer, input_ids=batch.teacher)
    teacher = teacher.reshape(-1, teacher.shape[-1])[batch.teacher_at].float()
    if student_embeds is None:
        student = _states(model, layer, input_ids=batch.student)
    else:
        student = _states(model, layer, inputs_embeds=student_embeds)
    student = student.reshape(-1, student.shape[-1])[batch.student_at].float()
    return torch.nn.functional.mse_loss(student, teacher)


def heldout_alias_distance(
    model, blocks: torch.Tensor, pieces: Mapping[int, Sequence[int]], batch_size: int, max_blocks: int
) -> float | None:
    """``alias_distance`` at the last layer over held-out blocks that hold a new token (every new token read as
    itself by the student): how differently the model reads text once its words are single tokens. None when no
    block holds one."""
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or blocks.shape[1] * 8)
    pairs = []
    for block in blocks[:max_blocks]:
        pair = alias_pair(block.tolist(), pieces, pieces, max_len)
        if pair is not None:
            pairs.append(pair)
    if not pairs:
        return None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = alias_batch(pairs[start : start + batch_size]).to(device)
            total += float(alias_distance(model, batch)) * len(batch.student_at)
            count += len(batch.student_at)
    model.train(was_training)
    return total / count
