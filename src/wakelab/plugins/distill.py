"""Built-in ``distill`` init (token distillation, AweDist: Dobler et al., arXiv 2505.20133): each new row is learnt so
that the base model reads the new token as it read the word spelled out.

The rows start as ``subword`` rows (the mean of the word's base sub-tokens). Then, for each word, snippets of the
run's corpus that hold it are read twice by the frozen base: as the *student* (the word as its one new token) and as
the *teacher* (the word in its original sub-tokens). The loss is the mean squared difference of the two readings'
hidden states at ``distill.target_layer`` at the word (its last piece, for the teacher) and every position after it;
only the new input rows learn (AdamW, no weight decay, constant lr). Other new words in a snippet are spelled out in
both readings, so each word learns from its own snippets only, and words can be trained a chunk at a time.

* Snippets come from the training part of the corpus (never the held-out text); a word with fewer than
  ``distill.min_occurrences`` occurrences, no usable sub-tokens, or none of the token budget left keeps its
  ``subword`` row, and is listed with its reason in the vocabulary report (``init.fallback_words``).
* Memory: only the positions of the new words' occurrences are held; each batch's snippets are cut from the token
  ids when it is read, and the rows being learnt are those of one chunk of words (with their AdamW state).
* Reproducible: the snippets chosen and their order come from a generator seeded with ``init.seed``; two runs on the
  same device give bit-identical rows.
* A stage of the run: a progress bar, the loss curve as ``init/loss`` (and ``init/seconds``) in MLflow.
* Output rows: a head tied to the input embedding gets the learnt rows; an untied head's new rows are the mean of
  the sub-tokens' head rows (``distill.output_rows=subword``), left as the resize drew them (``keep``), or learnt
  from that mean by next-token loss on the same snippets once the input rows are learnt (``next_token``: the
  student's reading with its learnt input row predicts each next token; only the new head rows learn).
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

import wakelab

#: Words whose rows learn at once (with their AdamW state): bounds memory whatever the lexicon's size.
WORDS_PER_CHUNK = 1024
#: Points of the ``init/loss`` curve logged at most (each the mean over its window of steps).
CURVE_POINTS = 200


class DistillConfig(wakelab.PluginConfig):
    """The `distill` init: which snippets it reads, where it compares the two readings, and how it learns."""

    snippets_per_word: int = Field(100, ge=1, description="Snippets read per new word (at most; fewer if rarer).")
    snippet_length: int = Field(
        50, ge=2, description="Tokens per snippet (the word's own read as one), about a quarter of them before it."
    )
    target_layer: int = Field(
        -1,
        description="Hidden states compared: layer 1..L of the model, or counted from the end (-1: the last).",
    )
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the new rows (constant, no weight decay).")
    epochs: int = Field(1, ge=1, description="Passes over each word's snippets.")
    batch_size: int = Field(16, ge=1, description="Snippets per optimizer step.")
    output_rows: Literal["subword", "keep", "next_token"] = Field(
        "subword",
        description="An untied head's new rows: the mean of the sub-tokens' head rows, as the resize drew them, or "
        "learnt from that mean by next-token loss on the same snippets (a tied head's are the input rows).",
    )
    min_occurrences: int = Field(
        1, ge=1, description="A word seen fewer times in the corpus keeps its subword row (listed in the report)."
    )
    token_budget: int | None = Field(
        None,
        gt=0,
        description="Snippet tokens read in all (spread evenly over the words; None: no limit).",
    )

    @field_validator("target_layer")
    @classmethod
    def _not_embeddings(cls, value: int) -> int:
        if value == 0:
            raise ValueError("layer 0 is the input embeddings themselves; give 1..L or -1 (the last layer)")
        return value


@wakelab.hookimpl
def config_section():
    return "distill", DistillConfig


@wakelab.hookimpl
def check_config(config):
    """A budget below one snippet leaves nothing to learn from: refused before anything is written."""
    cfg = config.distill
    if config.init.method == "distill" and cfg.token_budget is not None and cfg.token_budget < cfg.snippet_length:
        raise wakelab.ConfigError(
            f"distill.token_budget={cfg.token_budget} is less than one snippet (distill.snippet_length="
            f"{cfg.snippet_length} tokens); raise it, or leave it unset for no limit"
        )


def check_model(model_config, cfg: DistillConfig) -> int:
    """The target layer as an index into the hidden states; a layer or snippet the model lacks is a ConfigError.

    ``model_config`` is the base model's transformers config: the run asks before loading any weight
    (``check_inputs``), the init again on the model it is given."""
    layers = wakelab.layer_count(model_config)
    if not (1 <= cfg.target_layer <= layers or -layers <= cfg.target_layer <= -1):
        raise wakelab.ConfigError(
            f"distill.target_layer={cfg.target_layer} is outside the model: it has {layers} layers; give 1..{layers}, "
            f"or -{layers}..-1 counted from the last (-1 = the last)"
        )
    context = getattr(model_config, "max_position_embeddings", None)
    if context and cfg.snippet_length > context:
        raise wakelab.ConfigError(
            f"distill.snippet_length={cfg.snippet_length} is longer than the model's context of {context} tokens; "
            f"give at most {context}"
        )
    return cfg.target_layer


def nothing_to_distil(counts: list[int], usable: list[bool], min_occurrences: int) -> str | None:
    """Why no word can be distilled (one line naming the fix), or None when one can. ``counts[i]``: word i's
    occurrences in the corpus; ``usable[i]``: whether it has base sub-tokens to be read spelled out."""
    enough = [count >= min_occurrences for count in counts]
    if any(e and u for e, u in zip(enough, usable, strict=True)):
        return None
    most = max(counts, default=0)
    if most == 0:
        return (
            f"init.method=distill: none of the {len(counts)} new words occurs in the corpus, so there is nothing to "
            "distil from; give a corpus that uses them (data.corpus), or use init.method=subword"
        )
    if not any(enough):
        return (
            f"init.method=distill: no new word occurs at least distill.min_occurrences={min_occurrences} times in "
            f"the corpus (the most: {most}); lower distill.min_occurrences, or use init.method=subword"
        )
    return (
        f"init.method=distill: none of the {sum(enough)} new words the corpus uses enough has base sub-tokens to be "
        "read spelled out, so there is nothing to distil towards; use init.method=subword"
    )


@wakelab.hookimpl
def check_inputs(ctx):
    """A target layer or snippet the base model lacks, or a corpus that never uses the new words, refused before
    the run's directory or MLflow run is made (the init itself would find them only after both)."""
    if ctx.config.init.method != "distill":
        return
    cfg = ctx.config.distill
    check_model(ctx.model_config, cfg)
    if len(ctx.new_ids) == 0 or ctx.corpus_ids is None:
        return
    ids = np.asarray(ctx.corpus_ids)
    counts = np.bincount(ids[ids >= ctx.num_base] - ctx.num_base, minlength=len(ctx.new_ids)).tolist()
    counts = counts[: len(ctx.new_ids)]
    seen = [i for i, count in enumerate(counts) if count >= cfg.min_occurrences]
    usable = [False] * len(counts)
    spelled = wakelab.word_pieces(ctx.tokenizer, ctx.num_base, ctx.new_ids[seen], [ctx.new_words[i] for i in seen])
    for i, pieces in zip(seen, spelled, strict=True):
        usable[i] = bool(pieces)
    reason = nothing_to_distil(counts, usable, cfg.min_occurrences)
    if reason is not None:
        raise wakelab.DataError(reason)


def occurrences(ids: np.ndarray, num_base: int) -> dict[int, np.ndarray]:
    """Where each new token occurs in ``ids`` (positions, ascending), from one pass over the ids."""
    positions = np.flatnonzero(ids >= num_base)
    tokens = ids[positions]
    order = np.argsort(tokens, kind="stable")
    tokens, positions = tokens[order], positions[order]
    found, starts, counts = np.unique(tokens, return_index=True, return_counts=True)
    return {int(t): positions[s : s + c] for t, s, c in zip(found, starts, counts, strict=True)}


def plan_snippets(ctx, cfg, pieces, found, generator):
    """Which occurrences each word learns from: ``{slot: positions}``, and ``{word: reason}`` for those that don't."""
    fallback: dict[str, str] = {}
    eligible: list[tuple[int, int]] = []  # (slot, token id)
    for slot, (token_id, word) in enumerate(zip(ctx.new_ids.tolist(), ctx.new_words, strict=True)):
        seen = len(found.get(token_id, ()))
        if token_id not in pieces:
            fallback[word] = "no usable sub-tokens (the subword init's mean-init row)"
        elif seen < cfg.min_occurrences:
            fallback[word] = (
                f"{seen} occurrence(s) in the corpus, fewer than distill.min_occurrences={cfg.min_occurrences}"
            )
        else:
            eligible.append((slot, token_id))
    if not eligible:
        counts = [len(found.get(token_id, ())) for token_id in ctx.new_ids.tolist()]
        usable = [token_id in pieces for token_id in ctx.new_ids.tolist()]
        raise wakelab.DataError(nothing_to_distil(counts, usable, cfg.min_occurrences))
    per_word = cfg.snippets_per_word
    left = None if cfg.token_budget is None else cfg.token_budget // cfg.snippet_length
    if left is not None:
        per_word = min(per_word, max(1, left // len(eligible)))
    plan: dict[int, np.ndarray] = {}
    for slot, token_id in eligible:
        where = found[token_id]
        take = min(per_word, len(where)) if left is None else min(per_word, len(where), left)
        if take == 0:
            fallback[ctx.new_words[slot]] = f"distill.token_budget={cfg.token_budget} spent on earlier words"
            continue
        if take < len(where):
            where = np.sort(where[torch.randperm(len(where), generator=generator)[:take].numpy()])
        plan[slot] = where
        if left is not None:
            left -= take
    return plan, fallback


class _Curve:
    """The loss curve, logged to MLflow as means over windows of steps (at most CURVE_POINTS points)."""

    def __init__(self, ctx, total_steps: int, name: str = "init/loss"):
        self.ctx, self.name, self.every = ctx, name, max(1, -(-total_steps // CURVE_POINTS))
        self.window: list[float] = []
        self.step = 0
        self.first: float | None = None
        self.last: float | None = None

    def add(self, loss: float) -> None:
        self.step += 1
        self.window.append(loss)
        if len(self.window) == self.every:
            self.flush()

    def flush(self) -> None:
        if not self.window:
            return
        mean = sum(self.window) / len(self.window)
        self.first = mean if self.first is None else self.first
        self.last = mean
        if self.ctx.is_main_process:
            self.ctx.log_metrics({self.name: mean}, self.step)
        self.window = []


def snippet_batches(model, cfg, ids, slots, plan, pieces, token_of, generator):
    """The chunk's snippets, ``cfg.epochs`` times in an order drawn from ``generator``, a batch at a time: the
    ``AliasBatch`` (on the model's device) and its pairs, or None for a batch with nothing to compare."""
    device = next(model.parameters()).device
    context = int(getattr(model.config, "max_position_embeddings", 0) or cfg.snippet_length * 16)
    lead = cfg.snippet_length // 4
    snippets = [(slot, int(p)) for slot in slots for p in plan[slot]]
    for _ in range(cfg.epochs):
        order = torch.randperm(len(snippets), generator=generator).tolist()
        for start in range(0, len(order), cfg.batch_size):
            pairs = []
            for k in order[start : start + cfg.batch_size]:
                slot, at = snippets[k]
                begin = max(0, at - lead)
                window = ids[begin : begin + cfg.snippet_length]
                pair = wakelab.alias_pair(window, pieces, (token_of[slot],), context)
                if pair is not None:
                    pairs.append(pair)
            yield (wakelab.alias_batch(pairs).to(device), pairs) if pairs else None


def chunk_lookup(token_ids: list[int], device) -> torch.Tensor:
    """Token id -> its index among ``token_ids`` (-1 for any other id below the largest)."""
    lookup = torch.full((max(token_ids) + 1,), -1, dtype=torch.long, device=device)
    lookup[token_ids] = torch.arange(len(token_ids), device=device)
    return lookup


def chunk_index(lookup: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each token's index in the chunk (``chunk_lookup``), -1 where it is not one of the chunk's."""
    return lookup[tokens.clamp(max=len(lookup) - 1)].where(tokens < len(lookup), -1)


def student_embeds(embed, student: torch.Tensor, lookup: torch.Tensor, chunk_rows: torch.Tensor) -> torch.Tensor:
    """The student's input embeddings: the chunk's new tokens read as ``chunk_rows``, every other token as the
    model's own row."""
    at = chunk_index(lookup, student)
    base = embed(student).detach()
    mine = chunk_rows[at.clamp(min=0)].to(base.dtype)
    return torch.where((at >= 0).unsqueeze(-1), mine, base)


def distil_chunk(model, layer, cfg, ids, slots, plan, rows, pieces, token_of, generator, curve, bar) -> None:
    """Learn ``rows[slots]`` from their words' snippets (in place)."""
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()
    learnt = torch.nn.Parameter(rows[slots].clone().to(device))
    lookup = chunk_lookup([token_of[slot] for slot in slots], device)
    optimizer = torch.optim.AdamW([learnt], lr=cfg.lr, weight_decay=0.0)
    for item in snippet_batches(model, cfg, ids, slots, plan, pieces, token_of, generator):
        bar.update(1)
        if item is None:
            continue
        batch, _ = item
        embeds = student_embeds(embed, batch.student, lookup, learnt)
        loss = wakelab.alias_distance(model, batch, layer, student_embeds=embeds)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.add(float(loss.detach()))
    rows[slots] = learnt.detach().to(rows.device, rows.dtype)


def next_token_loss(hidden, targets, head, num_base, chunk_ids, learnt, lookup, rows_at_once=8192) -> torch.Tensor:
    """Mean cross-entropy of the next tokens ``targets`` ([n]) given the final hidden states ``hidden`` ([n, d], no
    grad), over the base vocabulary and the chunk's new tokens (``chunk_ids``), whose head rows are ``learnt``.

    Only ``learnt`` carries gradients: the base rows' log-sum-exp and the base targets' logits are made without
    grad, ``rows_at_once`` head rows at a time, so no ``[n, vocab]`` logits are held (128,256 rows at P1).
    """
    h = hidden.float()
    weight, bias = head.weight, getattr(head, "bias", None)
    with torch.no_grad():
        parts = []
        for start in range(0, num_base, rows_at_once):
            end = min(start + rows_at_once, num_base)  # never the new rows, whatever they hold
            logits = h @ weight[start:end].float().T
            if bias is not None:
                logits += bias[start:end].float()
            parts.append(logits.logsumexp(-1))
        base_lse = torch.stack(parts, -1).logsumexp(-1)
        is_base = targets < num_base
        safe = targets.where(is_base, 0)
        base_target = (h * weight[safe].float()).sum(-1)
        if bias is not None:
            base_target += bias[safe].float()
    new_logits = h @ learnt.float().T
    if bias is not None:
        new_logits = new_logits + bias[chunk_ids].float()
    at = chunk_index(lookup, targets)
    new_target = new_logits.gather(1, at.clamp(min=0).unsqueeze(1)).squeeze(1)
    target = torch.where(at >= 0, new_target, base_target)
    return (torch.logaddexp(base_lse, new_logits.logsumexp(-1)) - target).mean()


def learn_head_chunk(model, cfg, ids, slots, plan, rows, head, pieces, token_of, generator, num_base, curve, bar):
    """Learn an untied head's new rows ``head[slots]`` (in place) by next-token loss: the student reads each snippet
    with the chunk's input rows as distillation left them (``rows``), and every position predicts the next token
    (the word's own row is the target where it comes next, a competitor everywhere else)."""
    device = next(model.parameters()).device
    embed, out = model.get_input_embeddings(), model.get_output_embeddings()
    chunk_ids = torch.tensor([token_of[slot] for slot in slots], device=device)
    lookup = chunk_lookup(chunk_ids.tolist(), device)
    inputs = rows[slots].to(device)
    learnt = torch.nn.Parameter(head[slots].clone().to(device))
    optimizer = torch.optim.AdamW([learnt], lr=cfg.lr, weight_decay=0.0)
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), model)
    for item in snippet_batches(model, cfg, ids, slots, plan, pieces, token_of, generator):
        bar.update(1)
        if item is None:
            continue
        batch, pairs = item
        width = batch.student.shape[1]
        at = torch.tensor([row * width + i for row, p in enumerate(pairs) for i in range(len(p.student) - 1)])
        if len(at) == 0:
            continue
        with torch.no_grad():
            embeds = student_embeds(embed, batch.student, lookup, inputs)
            hidden = backbone(inputs_embeds=embeds, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])[at.to(device)]
        targets = batch.student.reshape(-1)[(at + 1).to(device)]
        loss = next_token_loss(hidden, targets, out, num_base, chunk_ids, learnt, lookup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.add(float(loss.detach()))
    head[slots] = learnt.detach().to(head.device, head.dtype)


def head_mode(model, cfg) -> str:
    """``tied`` when the head is the input embedding (or there is none), else ``distill.output_rows``."""
    head = model.get_output_embeddings()
    if head is None or head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        return "tied"
    return cfg.output_rows


def subword_head_rows(model, new_ids: list[int], pieces) -> torch.Tensor:
    """An untied head's new rows (float32, in ``new_ids`` order): the mean of the sub-tokens' head rows, or the row
    the resize drew for a word with no usable sub-tokens."""
    weight = model.get_output_embeddings().weight.data
    start = weight[torch.tensor(new_ids, device=weight.device)].float().cpu()
    for i, token_id in enumerate(new_ids):
        if token_id in pieces:
            start[i] = weight[torch.tensor(pieces[token_id], device=weight.device)].float().mean(0).cpu()
    return start


@wakelab.hookimpl
def init_embeddings(ctx):
    if ctx.method != "distill":
        return None
    started = time.monotonic()
    cfg = ctx.config.distill if ctx.config is not None and hasattr(ctx.config, "distill") else DistillConfig()
    if ctx.model is None or ctx.corpus_ids is None:
        raise wakelab.PluginError(
            "init.method=distill reads the run's corpus with the base model; this caller gave it "
            + ("no model" if ctx.model is None else "no corpus")
        )
    model = ctx.model
    layer = check_model(model.config, cfg)
    made = wakelab.subword_rows(ctx)
    rows = made.rows
    new_ids = ctx.new_ids.tolist()
    pieces = {token_id: spelled for token_id, spelled in zip(new_ids, made.pieces, strict=True) if spelled}
    ids = np.asarray(ctx.corpus_ids())
    generator = torch.Generator().manual_seed(int(ctx.options.get("seed", 0)))
    plan, fallback = plan_snippets(ctx, cfg, pieces, occurrences(ids, ctx.num_base), generator)

    slots = sorted(plan)
    token_of = dict(enumerate(new_ids))
    chunks = [slots[c : c + WORDS_PER_CHUNK] for c in range(0, len(slots), WORDS_PER_CHUNK)]
    steps = sum(-(-sum(len(plan[s]) for s in chunk) // cfg.batch_size) for chunk in chunks) * cfg.epochs
    head = head_mode(model, cfg)
    if cfg.output_rows == "next_token" and head == "tied":
        ctx.log(
            "distill init: the head is tied to the input embedding, so its new rows are the learnt input rows; "
            "distill.output_rows=next_token has no rows of its own to learn"
        )
    head_rows = subword_head_rows(model, new_ids, pieces) if head in ("subword", "next_token") else None
    curve = _Curve(ctx, steps)
    head_curve = _Curve(ctx, steps, "init/head_loss")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    from tqdm.auto import tqdm

    total = steps * (2 if head == "next_token" else 1)
    bar = tqdm(total=total, desc="distill init", unit="step", disable=not (ctx.progress and ctx.is_main_process))
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            for chunk in chunks:
                distil_chunk(model, layer, cfg, ids, chunk, plan, rows, pieces, token_of, generator, curve, bar)
            # After every input row is learnt, with the generator where they left it: the input rows do not depend
            # on distill.output_rows.
            for chunk in chunks if head == "next_token" else ():
                learn_head_chunk(
                    model, cfg, ids, chunk, plan, rows, head_rows, pieces, token_of, generator, ctx.num_base,
                    head_curve, bar,
                )  # fmt: skip
        curve.flush()
        head_curve.flush()
    finally:
        bar.close()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    ctx.weight[ctx.new_ids] = rows.to(ctx.weight.device, ctx.weight.dtype)
    if head_rows is not None:
        out = model.get_output_embeddings().weight
        out.data[ctx.new_ids.to(out.device)] = head_rows.to(out.device, out.dtype)

    seconds = time.monotonic() - started
    snippets = sum(len(v) for v in plan.values())
    fallen = list(fallback)
    ctx.report.update(
        method="distill",
        distilled=len(plan),
        fell_back=len(fallen),
        fallback_to="subword",
        fallback_words=[{"word": w, "reason": r} for w, r in fallback.items()],
    )
    if ctx.is_main_process:
        ctx.log_metrics({"init/words_distilled": len(plan), "init/words_fell_back": len(fallen)}, 0)
    loss_text = f"loss {curve.first:.4g} -> {curve.last:.4g}" if curve.first is not None else "no steps"
    if head_curve.first is not None:
        head += f" (next-token loss {head_curve.first:.4g} -> {head_curve.last:.4g})"
    ctx.log(
        f"distill init: {len(plan)} of {len(new_ids)} words distilled from {snippets:,} snippets of "
        f"{cfg.snippet_length} tokens at layer {layer} ({steps:,} steps, {loss_text}, {seconds:.1f} s); head: {head}"
    )
    if fallen:
        ctx.log(
            f"distill init: {len(fallen)} word(s) kept their subword row (reasons in vocab_report.json): "
            + ", ".join(fallen[:10])
            + (" ..." if len(fallen) > 10 else "")
        )
    return {
        "method": "distill",
        "words": len(new_ids),
        "distilled": len(plan),
        "fell_back": len(fallen),
        "fallback_words": ",".join(fallen[:20]),
        "snippets": snippets,
        "steps": steps,
        "target_layer": layer,
        "head": head_mode(model, cfg),
        "head_loss_first": head_curve.first if head_curve.first is not None else float("nan"),
        "head_loss_last": head_curve.last if head_curve.last is not None else float("nan"),
        "loss_first": curve.first if curve.first is not None else float("nan"),
        "loss_last": curve.last if curve.last is not None else float("nan"),
        "seconds": round(seconds, 3),
    }
