"""Lexicons and corpora from the real world: byte-order marks, NFC/NFD spellings, runaway lines, control characters;
and a hub that cannot be reached fails in seconds."""

from __future__ import annotations

import http.server
import json
import threading
import time
import unicodedata

import pytest
from conftest import tiny_overrides
from transformers import AutoTokenizer

from wakelab import hub
from wakelab.config import build_config
from wakelab.data.corpus import read_text
from wakelab.errors import ConfigError, ModelError
from wakelab.model import load_model_config
from wakelab.run import engine
from wakelab.vocab import expand_vocabulary, read_lexicon

BOM = "\ufeff"
NFC = unicodedata.normalize("NFC", "café")
NFD = unicodedata.normalize("NFD", "café")


@pytest.fixture
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_lexicon_bom_is_not_part_of_the_first_word(tmp_path):
    path = tmp_path / "lex.txt"
    path.write_bytes((BOM + "riverrun\nsmirtle\n").encode("utf-8"))
    assert read_lexicon(path) == ["riverrun", "smirtle"]


@pytest.mark.parametrize("what", ["corpus", "heldout"])
def test_corpus_and_heldout_bom_is_dropped(tmp_path, what):
    path = tmp_path / f"{what}.txt"
    path.write_bytes((BOM + "The riverrun rose.\n").encode("utf-8"))
    assert read_text(path, what) == "The riverrun rose.\n"


def test_nfc_and_nfd_spellings_are_one_word_by_default(tokenizer):
    assert NFC != NFD
    report, new_words = expand_vocabulary(tokenizer, [NFC, "riverrun", NFD], "word", "lex.txt")
    assert new_words == [NFC, "riverrun"]
    assert report.canonical_duplicates == [{"word": NFC, "forms": [NFC, NFD]}]
    assert report.duplicates == [NFC]
    assert "1 words written in more than one Unicode form, merged (vocab.normalize=nfc): café" in report.summary()
    assert tokenizer.convert_tokens_to_ids(" " + NFC) >= report.base_vocab_size  # word mode adds " word"


def test_normalize_none_keeps_spellings_apart_but_reports_them(tokenizer):
    report, new_words = expand_vocabulary(tokenizer, [NFC, NFD], "word", "lex.txt", normalize="none")
    assert new_words == [NFC, NFD]
    assert report.canonical_duplicates == [{"word": NFC, "forms": [NFC, NFD]}]
    assert "kept apart (vocab.normalize=none)" in report.summary()


def test_rejected_words_carry_their_reason_and_the_console_counts_them(tokenizer):
    runaway = "x" * 5000
    words = ["riverrun", "two words", "bell\x07", "zero\u200bwidth", runaway, "y" * 20]
    report, new_words = expand_vocabulary(tokenizer, words, "word", "lex.txt", max_word_chars=16)
    assert new_words == ["riverrun"]
    reasons = {r["word"][:12]: r["reason"] for r in report.rejected}
    assert reasons == {
        "two words": "inner whitespace (U+0020)",
        "bell\x07": "control character (U+0007)",
        "zero\u200bwidth": "control character (U+200B)",
        "x" * 12: "longer than 16 characters (5000; vocab.max_word_chars)",
        "y" * 12: "longer than 16 characters (20; vocab.max_word_chars)",
    }
    shown = next(r["word"] for r in report.rejected if r["word"].startswith("x"))
    assert shown.endswith("... (5000 characters)") and len(shown) < 120  # the report is not flooded
    summary = report.summary()
    assert "5 rejected" in summary
    assert (
        "rejected words (each with its reason in vocab_report.json): control character: 2, longer than 16 "
        "characters: 2, inner whitespace: 1" in summary
    )


def test_default_limit_rejects_a_runaway_line_but_keeps_a_thunderword(tokenizer):
    thunder = "bababadalgharaghtakamminarronnkonnbronntonnerronntuonnthunntrovarrhounawnskawntoohoohoordenenthurnuk"
    assert len(thunder) == 100
    report, new_words = expand_vocabulary(tokenizer, [thunder, "z" * 5000], "word", "lex.txt")
    assert new_words == [thunder]
    assert [r["reason"] for r in report.rejected] == ["longer than 128 characters (5000; vocab.max_word_chars)"]


def test_run_uses_the_vocab_options_and_reports_reasons(tiny_model, texts, tmp_path):
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_bytes((BOM + "\n".join(["riverrun", NFD, NFC, "two words"]) + "\n").encode("utf-8"))
    config = build_config(
        None, None, tiny_overrides(tiny_model, texts, **{"vocab.lexicon": str(lexicon), "train.max_steps": 1})
    )
    engine.run(config, progress=False)
    report = json.loads((tmp_path / "out" / "vocab_report.json").read_text(encoding="utf-8"))
    assert report["added"] == 2 and report["rejected_count"] == 1
    assert report["rejected"] == [{"word": "two words", "reason": "inner whitespace (U+0020)"}]
    assert report["canonical_duplicates"] == [{"word": NFC, "forms": [NFD, NFC]}]
    assert report["normalize"] == "nfc"


@pytest.mark.parametrize(("normalize", "meetings"), [("nfc", 20), ("none", 0)])
def test_a_decomposed_word_in_the_corpus_meets_its_token_under_nfc(tokenizer, tmp_path, normalize, meetings):
    from wakelab.config import DataConfig
    from wakelab.data.corpus import build_datasets
    from wakelab.vocab import word_token_id

    expand_vocabulary(tokenizer, [NFC], "word", "lex.txt", normalize=normalize)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(f"the river ran past the {NFD} by the hill\n" * 20, encoding="utf-8")
    ids = build_datasets(DataConfig(seq_len=8), str(corpus), None, tokenizer, None, normalize).train_ids
    assert (ids == word_token_id(tokenizer.get_vocab(), NFC)).sum() == meetings


def test_vocab_options_are_validated():
    with pytest.raises(ConfigError, match="vocab.normalize"):
        build_config(None, None, {"vocab.normalize": "nfkc"})
    with pytest.raises(ConfigError, match="vocab.max_word_chars"):
        build_config(None, None, {"vocab.max_word_chars": 0})


def test_unreachable_hub_fails_in_seconds(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    hub.reachable.cache_clear()
    started = time.monotonic()
    with pytest.raises(
        ModelError,
        match=r"the Hugging Face hub \(http://127.0.0.1:9\) cannot be reached and it is "
        r"not in the local cache",
    ):
        load_model_config("wakelab-tests/no-such-model")
    assert time.monotonic() - started < 10
    hub.reachable.cache_clear()


def test_hub_probe_sees_a_server_that_answers(monkeypatch):
    from huggingface_hub import constants

    # CI sets HF_HUB_OFFLINE=1 (the probe then answers False without asking), and a proxy in the environment would
    # carry the loopback request away: this test is about the request itself, so neither may apply.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    hub.reachable.cache_clear()

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert hub.reachable(f"http://127.0.0.1:{server.server_port}") is True
        assert hub.reachable("http://127.0.0.1:9") is False
    finally:
        server.shutdown()
        hub.reachable.cache_clear()
