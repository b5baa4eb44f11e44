"""How wakelab talks while it works: one line on stderr, prefixed ``wakelab:``, so stdout stays for results.

Progress comes from rank 0 only (under torchrun the ranks would repeat one another); a warning comes from whichever
rank meets it, naming the rank when there are several. Plugins use the same two functions (``wakelab.log``,
``wakelab.warn``).
"""

from __future__ import annotations

import os
import sys


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    """Whether this process speaks for the run: always in a single process, rank 0 under torchrun."""
    return _rank() == 0


def log(message: str) -> None:
    """Progress: what is happening now (rank 0 only)."""
    if _rank() != 0:
        return  # several processes (torchrun): rank 0 speaks for all of them
    print(f"wakelab: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """Something went wrong but the work goes on (every rank; the rank is named when it is not 0)."""
    rank = _rank()
    where = f" [rank {rank}]" if rank else ""
    print(f"wakelab{where}: warning: {message}", file=sys.stderr, flush=True)
