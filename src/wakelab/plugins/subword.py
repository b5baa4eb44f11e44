"""Built-in ``subword`` init: each new row is the mean of the base rows of the word's own sub-tokens.

Before it was added, ``riverrun`` was read by the model as a few base tokens (`` river`` + ``run``); starting the new
row at the mean of those rows starts it where the model already put the word's pieces. The word is tokenized the
way it appears in running text: a word added with ``vocab.add_as=word`` (an ``AddedToken`` with ``lstrip``) follows
a space, so `` riverrun`` is tokenized; one added as ``plain`` is tokenized bare.

The tokenizer the hook sees already holds the new words (it would return the new token itself), so the word is
tokenized with the base tokenizer: ``ctx.base_tokenizer`` when the engine passes one, else the expanded
tokenizer's own normalizer, pre-tokenizer and model, which never see the added tokens. A word whose sub-tokens are
unusable (none, or all unknown) gets a ``mean`` init row instead (N(mean, init.scale x cov) of the base rows); how
many did is logged and returned.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import wakelab
from wakelab import PluginError, base_moments, gaussian_rows, mean_row_norm, sampling_factor

#: Words shown in the log as examples of what was averaged.
EXAMPLES = 3


def base_encoder(ctx) -> Callable[[str], list[int]]:
    """Token ids of a text under the base vocabulary (no added words)."""
    if ctx.base_tokenizer is not None:
        return lambda text: list(ctx.base_tokenizer.encode(text, add_special_tokens=False))
    backend = getattr(ctx.tokenizer, "backend_tokenizer", None)
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


def surface_form(tokenizer, token_id: int, word: str) -> str:
    """The text the word stands for in running text: `` word`` when added with its space (or with lstrip), else
    ``word``."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(int(token_id))
    if added is not None and str(getattr(added, "content", "")) == " " + word:
        return " " + word
    return " " + word if getattr(added, "lstrip", False) else word


def usable_ids(ids: list[int], num_base: int, unk_id: int | None) -> list[int]:
    """The base sub-token ids that say something about the word: all but unknown tokens (and any non-base id)."""
    return [i for i in ids if 0 <= i < num_base and i != unk_id]


@wakelab.hookimpl
def init_embeddings(ctx):
    if ctx.method != "subword":
        return None
    weight = ctx.weight
    encode = base_encoder(ctx)
    tokenizer = ctx.base_tokenizer if ctx.base_tokenizer is not None else ctx.tokenizer
    unk_id = getattr(tokenizer, "unk_token_id", None)

    def token_text(i: int) -> str:
        return str(tokenizer.convert_ids_to_tokens(int(i)))

    rows = torch.empty(len(ctx.new_ids), weight.shape[1], dtype=torch.float32)
    fallback: list[int] = []
    counts: list[int] = []
    examples: list[str] = []
    forms = set()
    for position, (token_id, word) in enumerate(zip(ctx.new_ids.tolist(), ctx.new_words, strict=True)):
        form = surface_form(ctx.tokenizer, token_id, word)
        forms.add("' word'" if form.startswith(" ") else "'word'")
        ids = usable_ids(encode(form), ctx.num_base, unk_id)
        if not ids:
            fallback.append(position)
            continue
        rows[position] = weight[torch.tensor(ids, device=weight.device)].float().mean(dim=0).cpu()
        counts.append(len(ids))
        if len(examples) < EXAMPLES:
            examples.append(f"{word} = mean({', '.join(token_text(i) for i in ids)})")

    scale = float(ctx.options.get("scale", 1.0))
    if fallback:
        mean, cov = base_moments(weight, ctx.num_base)
        factor, _ = sampling_factor(cov, scale)
        rows[fallback] = gaussian_rows(len(fallback), mean, factor, ctx.generator)
    weight[ctx.new_ids] = rows.to(weight.device, weight.dtype)

    fallen = [ctx.new_words[p] for p in fallback]
    base_norm = mean_row_norm(weight, ctx.num_base)
    new_norm = float(rows.norm(dim=1).mean()) if len(rows) else 0.0
    mean_count = sum(counts) / len(counts) if counts else 0.0
    ctx.log(
        f"subword init: {len(counts)} of {len(ctx.new_ids)} rows set to the mean of the word's base sub-tokens "
        f"({' and '.join(sorted(forms))} form, {mean_count:.2f} sub-tokens on average; e.g. {'; '.join(examples)}); "
        f"mean new-row norm {new_norm:.4f} vs base {base_norm:.4f}"
    )
    ctx.log(
        f"subword init: {len(fallen)} word(s) had no usable sub-tokens"
        + (
            f" and fell back to the mean init (scale {scale:g}): {', '.join(fallen[:10])}"
            + (" ..." if len(fallen) > 10 else "")
            if fallen
            else ""
        )
    )
    return {
        "method": "subword",
        "words": len(ctx.new_ids),
        "from_subwords": len(counts),
        "mean_subtokens": round(mean_count, 4),
        "fell_back": len(fallen),
        "fallback": "mean",
        "fallback_scale": scale,
        "fallback_words": ",".join(fallen[:20]),
        "base_mean_norm": base_norm,
        "new_mean_norm": new_norm,
    }
