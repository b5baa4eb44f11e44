"""A new word's base sub-tokens, and the ``subword`` init's rows: the mean of those sub-tokens' base rows.

Before it was added, ``riverrun`` was read by the model as a few base tokens (`` river`` + ``run``); starting the new
row at the mean of those rows starts it where the model already put the word's pieces. The word is tokenized the
way it appears in running text: a word added with ``vocab.add_as=word`` (an ``AddedToken`` with ``lstrip``) follows
a space, so `` riverrun`` is tokenized; one added as ``plain`` is tokenized bare.

The tokenizer an init sees already holds the new words (it would return the new token itself), so the word is
tokenized with the base tokenizer: ``ctx.base_tokenizer`` when the engine passes one, else the expanded
tokenizer's own normalizer, pre-tokenizer and model, which never see the added tokens. A word whose sub-tokens are
unusable (none, or all unknown) gets a ``mean`` init row instead (N(mean, init.scale x cov) of the base rows).

Two inits share this module: ``subword`` itself, and ``distill``, which starts from these rows and keeps them for
the words it cannot distil (so such a word's row is exactly the one ``subword`` gives it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import PluginError
from .gaussian import base_moments, gaussian_rows, sampling_factor

#: Words shown in the log as examples of what was averaged.
EXAMPLES = 3


def base_encoder(tokenizer, base_tokenizer=None) -> Callable[[str], list[int]]:
    """Token ids of a text under the base vocabulary (no added words): ``base_tokenizer``'s when given, else those of
    the expanded ``tokenizer``'s own normalizer, pre-tokenizer and model."""
    if base_tokenizer is not None:
        return lambda text: list(base_tokenizer.encode(text, add_special_tokens=False))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PluginError(
            "the subword init needs a fast (tokenizers-backed) tokenizer, or a base tokenizer in the InitContext"
        )

    def encode(text: str) -> list[int]:
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
        return [token.id for piece, _ in pieces for token in backend.model.tokenize(piece)]

    return encode


def added_tokens(tokenizer) -> dict:
    """The tokenizer's added tokens by id. Read it once per pass: transformers builds the whole dict on every
    access, so asking it once per word was quadratic (hours for P1's 44,195 words)."""
    return dict(getattr(tokenizer, "added_tokens_decoder", {}))


def surface_form(tokenizer, token_id: int, word: str, added: dict | None = None) -> str:
    """The text the word stands for in running text: `` word`` when added with its space (or with lstrip), else
    ``word``. ``added``: :func:`added_tokens` of ``tokenizer``, when the caller asks for many words."""
    added = (added if added is not None else added_tokens(tokenizer)).get(int(token_id))
    if added is not None and str(getattr(added, "content", "")) == " " + word:
        return " " + word
    return " " + word if getattr(added, "lstrip", False) else word


def usable_ids(ids: list[int], num_base: int, unk_id: int | None) -> list[int]:
    """The base sub-token ids that say something about the word: all but unknown tokens (and any non-base id)."""
    return [i for i in ids if 0 <= i < num_base and i != unk_id]


def word_pieces(tokenizer, num_base: int, new_ids, new_words: list[str], base_tokenizer=None) -> list[list[int]]:
    """For each new word (in ``new_ids`` order), the base sub-token ids that spell it out as it appears in running
    text; an empty list when it has none that are usable. ``tokenizer`` is the expanded one."""
    encode = base_encoder(tokenizer, base_tokenizer)
    unk_id = getattr(base_tokenizer if base_tokenizer is not None else tokenizer, "unk_token_id", None)
    added = added_tokens(tokenizer)
    return [
        usable_ids(encode(surface_form(tokenizer, token_id, word, added)), num_base, unk_id)
        for token_id, word in zip(torch.as_tensor(new_ids).tolist(), new_words, strict=True)
    ]


@dataclass
class SubwordRows:
    """The ``subword`` init's rows (float32, one per new word, in ``new_ids`` order) and how they were made."""

    rows: torch.Tensor
    pieces: list[list[int]]
    fallback: list[int] = field(default_factory=list)  # positions whose word had no usable pieces (mean init rows)
    examples: list[str] = field(default_factory=list)
    forms: set[str] = field(default_factory=set)
    scale: float = 1.0

    @property
    def mean_count(self) -> float:
        counts = [len(p) for p in self.pieces if p]
        return sum(counts) / len(counts) if counts else 0.0


def subword_rows(ctx) -> SubwordRows:
    """Each new word's row: the mean of its base sub-tokens' rows; a word with none gets a ``mean`` init row (drawn
    from ``ctx.generator``). Nothing is written to ``ctx.weight``."""
    weight = ctx.weight
    tokenizer = ctx.base_tokenizer if ctx.base_tokenizer is not None else ctx.tokenizer
    pieces = word_pieces(ctx.tokenizer, ctx.num_base, ctx.new_ids, ctx.new_words, ctx.base_tokenizer)
    result = SubwordRows(torch.empty(len(ctx.new_ids), weight.shape[1], dtype=torch.float32), pieces)
    result.scale = float(ctx.options.get("scale", 1.0))
    added = added_tokens(ctx.tokenizer)
    for position, (token_id, word, ids) in enumerate(zip(ctx.new_ids.tolist(), ctx.new_words, pieces, strict=True)):
        form = surface_form(ctx.tokenizer, token_id, word, added)
        result.forms.add("' word'" if form.startswith(" ") else "'word'")
        if not ids:
            result.fallback.append(position)
            continue
        result.rows[position] = weight[torch.tensor(ids, device=weight.device)].float().mean(dim=0).cpu()
        if len(result.examples) < EXAMPLES:
            shown = ", ".join(str(tokenizer.convert_ids_to_tokens(int(i))) for i in ids)
            result.examples.append(f"{word} = mean({shown})")
    if result.fallback:
        mean, cov = base_moments(weight, ctx.num_base)
        factor, _ = sampling_factor(cov, result.scale)
        result.rows[result.fallback] = gaussian_rows(len(result.fallback), mean, factor, ctx.generator)
    return result
