"""Where wakelab keeps what it builds once and reuses: converted models, tokenizers, token caches, demo texts.

Its own module so the modules that fill the cache (model, demo, bpe, data) share one answer without importing one
another.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """``$WAKELAB_CACHE``, else ``~/.cache/wakelab``."""
    return Path(os.environ.get("WAKELAB_CACHE", Path.home() / ".cache" / "wakelab"))


@contextlib.contextmanager
def publishing(folder: Path) -> Iterator[Path]:
    """A private folder to build a cache entry in; on success it becomes ``folder`` in one rename.

    An entry is there whole or not at all, and two processes (torchrun's ranks, a second terminal) may build the
    same one at once: each builds into its own temporary folder, and the one that renames second drops its copy,
    since the first published the same thing. A failed build leaves nothing behind.
    """
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crashed process that had this pid
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(folder)
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(tmp)  # another process published it first


@contextlib.contextmanager
def publishing_file(path: Path) -> Iterator[Path]:
    """A private file to write a cache file in; on success it becomes ``path`` in one rename.

    The file counterpart of :func:`publishing`: the temporary name carries the pid, so two processes writing the
    same file at once never write into one another's, and a failed write leaves nothing behind. (Checkpoints and
    recordings, which must also survive a power cut, add fsyncs: ``storage``.)
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
