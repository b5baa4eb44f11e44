"""Cache entries are published whole: by one rename, by the first of two processes, never half-built."""

from __future__ import annotations

import pytest

from wakelab.paths import publishing, publishing_file


def test_a_built_folder_is_published_and_its_temporary_folder_is_gone(tmp_path):
    target = tmp_path / "cache" / "entry"
    with publishing(target) as tmp:
        assert not target.exists()
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry"]


def test_the_second_of_two_builders_keeps_the_first_ones_entry(tmp_path):
    target = tmp_path / "cache" / "entry"
    target.mkdir(parents=True)
    (target / "config.json").write_text("first")
    with publishing(target) as tmp:
        (tmp / "config.json").write_text("second")
    assert (target / "config.json").read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry"]


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    target = tmp_path / "cache" / "entry"
    with pytest.raises(RuntimeError, match="save failed"), publishing(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("save failed")
    assert list(target.parent.iterdir()) == []


def test_a_written_file_is_published_whole_and_a_failed_write_leaves_the_old_one(tmp_path):
    target = tmp_path / "corpus.txt"
    with publishing_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("first", encoding="utf-8")
        assert not target.exists()  # nobody sees it before the rename
    assert target.read_text(encoding="utf-8") == "first"
    with pytest.raises(RuntimeError), publishing_file(target) as tmp:
        tmp.write_text("half", encoding="utf-8")
        raise RuntimeError("disk full")
    assert target.read_text(encoding="utf-8") == "first"
    assert not list(tmp_path.glob("*.tmp"))
