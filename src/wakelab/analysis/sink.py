"""Where an analysis goes: files in a local folder, mirrored as MLflow artifacts under ``analysis/``, plus metrics
and tags on one MLflow run.

Tables are written twice, as JSON (a list of row objects) and CSV (one header line, one line a row); figures as PNG
through :func:`wakelab.analysis.plots.save_figure`. Nothing reaches MLflow until :meth:`AnalysisSink.flush`, which
uses ``MlflowClient`` with an explicit run id: logging into a finished (or failed) run never reopens it or changes
its status.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..storage.writepoint import published_file
from .plots import save_figure

ARTIFACT_ROOT = "analysis"


def _plain(value: Any) -> Any:
    """JSON-safe: NaN/inf become None, tensors and numpy scalars become Python numbers, paths strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _plain(value.item())
    return value


class AnalysisSink:
    """Collects tables, figures, text, metrics and tags of one analysis and writes them out."""

    def __init__(self, local_dir: Path, run_id: str | None = None, client=None, root: str = ARTIFACT_ROOT):
        self.local_dir = Path(local_dir)
        self.root = root  # the artifact folder and metric prefix (``wakelab evaluate`` uses ``evaluate``)
        self.run_id = run_id
        self.client = client
        self.files: list[Path] = []
        self._metrics: list[tuple[str, float, int]] = []
        self._tags: dict[str, str] = {}

    # -- files -------------------------------------------------------------------------------------------------------
    def _path(self, relative: str) -> Path:
        path = self.local_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path not in self.files:
            self.files.append(path)
        return path

    def table(self, relative: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """``relative``.json and ``relative``.csv from a list of flat row dicts (column order: first seen)."""
        rows = [_plain(dict(row)) for row in rows]
        with published_file(self._path(f"{relative}.json")) as tmp:
            tmp.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        columns: list[str] = []
        for row in rows:
            columns += [key for key in row if key not in columns]
        with (
            published_file(self._path(f"{relative}.csv")) as tmp,
            tmp.open("w", newline="", encoding="utf-8") as handle,
        ):
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else v)
                                 for k, v in row.items()})  # fmt: skip

    def json(self, relative: str, obj: Any) -> None:
        with published_file(self._path(f"{relative}.json")) as tmp:
            tmp.write_text(json.dumps(_plain(obj), indent=1) + "\n", encoding="utf-8")

    def figure(self, relative: str, fig) -> None:
        with published_file(self._path(f"{relative}.png")) as tmp:
            save_figure(fig, tmp)

    def text(self, relative: str, text: str) -> None:
        with published_file(self._path(relative)) as tmp:
            tmp.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")

    # -- metrics and tags ----------------------------------------------------------------------------------------------
    def metrics(self, values: Mapping[str, Any], step: int = 0) -> None:
        """Metrics named ``<root>/<key>`` (``analysis/<key>``); None, NaN and non-numbers are skipped."""
        for key, value in values.items():
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, (int, float)) and math.isfinite(float(value)):
                self._metrics.append((f"{self.root}/{key}", float(value), int(step)))

    def tags(self, values: Mapping[str, Any]) -> None:
        self._tags.update({k: str(v) for k, v in values.items()})

    @property
    def metric_names(self) -> list[str]:
        return sorted({name for name, _, _ in self._metrics})

    # -- out -----------------------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Log metrics, tags and every written file (under ``<root>/``, keeping sub-folders) to the run."""
        if self.client is None or self.run_id is None:
            return
        from mlflow.entities import Metric, RunTag

        from ..tracking.runs import tag_value

        stamp = int(time.time() * 1000)
        metrics = [Metric(name, value, stamp, step) for name, value, step in self._metrics]
        tags = [RunTag(k, tag_value(v)) for k, v in self._tags.items()]
        for start in range(0, max(len(metrics), 1), 1000):
            chunk = metrics[start : start + 1000]
            if chunk or (start == 0 and tags):
                self.client.log_batch(self.run_id, metrics=chunk, tags=tags if start == 0 else [])
        for path in self.files:
            parent = path.parent.relative_to(self.local_dir).as_posix()
            artifact_path = self.root if parent == "." else f"{self.root}/{parent}"
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        self._metrics.clear()
        self._tags.clear()
