"""One error for all ranks: what a failing rank hands the others, and the single-process no-op.

The two-process behaviour (a pre-flight failure on rank 1 only) is tested under torchrun in test_ddp_stop_slow.py.
"""

from __future__ import annotations

import pytest

from wakelab.errors import ConfigError
from wakelab.run import ranks


def test_a_user_error_travels_as_its_own_line_and_exit_status():
    assert ranks._outcome(ConfigError("data.seq_len=9999 is beyond the model's maximum\nmore")) == (
        "data.seq_len=9999 is beyond the model's maximum",
        2,
    )
    assert ranks._outcome(None) is None


def test_a_bug_travels_as_one_line_naming_its_type():
    assert ranks._outcome(RuntimeError("disk not mounted")) == ("RuntimeError before training: disk not mounted", 1)


def test_single_process_meeting_points_are_no_ops_and_errors_pass_through():
    calls = []

    @ranks.one_error_for_all
    def job(fail: bool):
        ranks.agree()
        calls.append("met")
        ranks.agree(last=True)
        if fail:
            raise ConfigError("bad value")
        return "done"

    assert job(False) == "done"
    with pytest.raises(ConfigError, match="^bad value$"):
        job(True)
    assert calls == ["met", "met"] and ranks._stack == []
