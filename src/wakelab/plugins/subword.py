"""Built-in ``subword`` init: each new row is the mean of the base rows of the word's own sub-tokens.

Before it was added, ``riverrun`` was read by the model as a few base tokens (`` river`` + ``run``); starting the new
row at the mean of those rows starts it where the model already put the word's pieces. The word is tokenized the
way it appears in running text: a word added with ``vocab.add_as=word`` (an ``AddedToken`` with ``lstrip``) follows
a space, so `` riverrun`` is tokenized; one added as ``plain`` is tokenized bare.

The rows come from ``wakelab.subword_rows`` (shared with the ``distill`` init, which starts from them): the word
is split with the base tokenizer, and a word whose sub-tokens are unusable (none, or all unknown) gets a ``mean``
init row instead (N(mean, init.scale x cov) of the base rows); how many did is logged and returned.
"""

from __future__ import annotations

import wakelab
from wakelab import mean_row_norm


@wakelab.hookimpl
def init_embeddings(ctx):
    if ctx.method != "subword":
        return None
    weight = ctx.weight
    made = wakelab.subword_rows(ctx)
    rows, scale = made.rows, made.scale
    fallback, examples, forms, mean_count = made.fallback, made.examples, made.forms, made.mean_count
    counts = [p for p in made.pieces if p]
    weight[ctx.new_ids] = rows.to(weight.device, weight.dtype)

    fallen = [ctx.new_words[p] for p in fallback]
    base_norm = mean_row_norm(weight, ctx.num_base)
    new_norm = float(rows.norm(dim=1).mean()) if len(rows) else 0.0
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
