"""Left-padded batches continued from the KV cache read each sequence as it reads alone: the helper itself on Llama
and GPT-2, the meaning probe against a full-sequence computation, and batched sampling against one prompt at a time."""

from __future__ import annotations

import statistics

import pytest
import torch

from wakelab.analysis import batched
from wakelab.analysis.evaluate.sampling import Sampling, sample
from wakelab.analysis.probe import Probe, ProbeWord, probe

SEQS = [[5, 17, 42, 9, 3, 11], [7], [8, 8, 30, 2]]
MORE = [[4, 12], [6], [19, 20, 21]]


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()


@pytest.fixture(scope="module")
def llama(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def _alone(model, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([seq])).logits[0, -1].float()


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_a_padded_batch_and_its_continuation_read_each_sequence_as_alone(which, request):
    model = request.getfixturevalue("llama") if which == "llama" else _gpt2()
    logits, batch = batched.start(model, SEQS)
    for row, seq in enumerate(SEQS):
        torch.testing.assert_close(logits[row], _alone(model, seq), atol=1e-4, rtol=1e-4)
    after, _ = batched.extend(model, batched.repeat(batch, 2), [s for s in MORE for _ in range(2)])
    for row, (seq, more) in enumerate(zip(SEQS, MORE, strict=True)):
        for copy in range(2):  # each prefix repeated, both copies continued alike
            torch.testing.assert_close(after[2 * row + copy], _alone(model, seq + more), atol=1e-4, rtol=1e-4)


def _reference_probe(model, p: Probe) -> dict[str, dict[str, float]]:
    """The probe's figures from whole sequences, one at a time, as its definition reads."""
    away = [_alone(model, s) for s in p.elsewhere]
    out = {}
    for w in p.words:
        kls, slots, slot_logits, ranks = [], [], [], []
        for prefix in w.prefixes:
            slot = _alone(model, prefix)
            after_meaning = torch.log_softmax(_alone(model, prefix + w.meaning_ids), 0)
            after_coined = torch.log_softmax(_alone(model, prefix + [w.token_id]), 0)
            kls.append(float((after_meaning.exp() * (after_meaning - after_coined)).sum()))
            slots.append(float(torch.log_softmax(slot, 0)[w.token_id]))
            slot_logits.append(float(slot[w.token_id]))
            ranks.append(1 + int((slot > slot[w.token_id]).sum()))
        away_lp = [float(torch.log_softmax(a, 0)[w.token_id]) for a in away]
        away_logit = [float(a[w.token_id]) for a in away]
        wins = sum((h > v) + 0.5 * (h == v) for h in slot_logits for v in away_logit)
        out[w.word] = {"kl": statistics.mean(kls), "substitution": statistics.mean(slots) - statistics.mean(away_lp),
                       "auc": wins / (len(slot_logits) * len(away_logit)), "rank": float(statistics.median(ranks)),
                       "contexts": float(len(kls))}  # fmt: skip
    return out


def test_the_probe_from_cached_prefixes_equals_whole_sequences_one_at_a_time(llama):
    vocab = llama.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(0, vocab - 2, (n,), generator=g).tolist()

    words = [
        ProbeWord("alpha", vocab - 1, "a", ids(1), [ids(5), ids(12), ids(1)]),
        ProbeWord("beta", vocab - 2, "b c", ids(3), [ids(7), ids(9)]),
        ProbeWord("gamma", vocab - 3, "d", ids(2), []),
    ]  # fmt: skip  (no context: left out)
    p = Probe(words=words, elsewhere=[ids(n) for n in (4, 10, 6, 2, 8)])
    got = probe(llama, p, batch_size=2)  # batches that split a word's contexts
    want = _reference_probe(llama, Probe(words=words[:2], elsewhere=p.elsewhere))
    assert set(got) == {"alpha", "beta"}
    for word, figures in want.items():
        for key, value in figures.items():
            assert got[word][key] == pytest.approx(value, abs=1e-4), (word, key)
    assert not llama.training


def test_prompts_sampled_together_write_what_each_writes_alone(llama):
    settings = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=4)
    together = sample(llama, SEQS, 3, settings, streams=[0, 1, 2])
    split = sample(llama, SEQS, 3, settings, batch_rows=3)  # one prompt per batch
    alone = [sample(llama, [seq], 3, settings, streams=[i])[0] for i, seq in enumerate(SEQS)]
    assert together == split == alone
    assert len({tuple(r) for outs, _ in together for r in outs}) > 3  # the dice differ by prompt and sample
