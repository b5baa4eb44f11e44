"""Cache entries are published whole: by one rename, by the first of two processes, never half-built."""

from __future__ import annotations

import pytest

from wakelab.paths import publishing


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
