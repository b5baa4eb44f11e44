"""The run's texts as MLflow datasets, so the runs table's Dataset column says what a run trained and was tested on.

Each of the corpus (context ``training``), the held-out text (``evaluation``) and the lexicon (``lexicon``) is
logged with ``log_inputs`` as a dataset whose source is the file, whose digest is the file's content hash (two runs
on the same text show the same digest, wherever the file lives), and whose profile holds its counts (bytes, lines,
words, and tokens under the run's tokenizer when known). Nothing is uploaded: the files stay where they are.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["log_run_datasets", "text_dataset"]


def _counts(path: Path) -> tuple[str, dict[str, int]]:
    digest = hashlib.sha256()
    lines = words = size = 0
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
            lines += chunk.count(b"\n")
            words += len(chunk.split())  # a word cut at a chunk edge counts twice: rare and harmless for a profile
    return digest.hexdigest()[:8], {"bytes": size, "lines": lines, "words": words}


def text_dataset(path: str | Path, name: str, **more_counts: int):
    """An MLflow dataset for a text file: local source, content digest, and a profile of its counts."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    path = Path(path).resolve()
    digest, profile = _counts(path)
    profile.update({k: int(v) for k, v in more_counts.items() if v is not None})

    class TextDataset(MetaDataset):
        @property
        def profile(self) -> Any:
            return profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(profile)}

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": two local-file sources, either will do
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(path))
    return TextDataset(source, name=name, digest=digest)


def log_run_datasets(run_id: str, *, corpus: str | None, heldout: str | None, lexicon: str | None,
                     corpus_tokens: int | None = None, heldout_tokens: int | None = None,
                     lexicon_added: int | None = None) -> None:  # fmt: skip
    """Log the run's corpus, held-out text and lexicon as dataset inputs of ``run_id``."""
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for path, context, counts in ((corpus, "training", {"tokens": corpus_tokens}),
                                  (heldout, "evaluation", {"tokens": heldout_tokens}),
                                  (lexicon, "lexicon", {"added_tokens": lexicon_added})):  # fmt: skip
        if path is None:
            continue
        dataset = text_dataset(path, f"{context}:{Path(path).name}", **counts)
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)]))
    if inputs:
        MlflowClient().log_inputs(run_id, datasets=inputs)


def try_log_run_datasets(run_id: str | None, warn, **kwargs: Any) -> None:
    """:func:`log_run_datasets`, with a failure (an unreadable file, a store that is away) a warning, not an error."""
    if run_id is None:
        return
    try:
        log_run_datasets(run_id, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the Dataset column is a convenience; training goes on
        warn(f"the corpus, held-out text and lexicon were not logged as MLflow datasets: {exc}")
