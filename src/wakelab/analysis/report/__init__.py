"""``wakelab analyze``: the P1 evaluation of a run's embeddings and the dynamics of its recording, as files and in
MLflow.

For one run (:func:`analyze_run`) on a chosen state (final, a checkpoint, or the state right after init):

- norms of all / base / new rows (table + histogram), isotropy of base and new rows with a confidence interval
  (table + plot), nearest-neighbour probes among base and among new tokens (table);
- the training-loss curve (MLflow's ``loss`` history, else the latest checkpoint's ``trainer_state.json``);
- held-out perplexity before vs after training, recomputed from the initial and the analysed state (or the logged
  metrics with ``evaluate=False``);
- with a recording: the dynamics of :mod:`wakelab.analysis.dynamics.from_recording` (displacement, freeze verdict and
  onset, bf16 lattice hops, centroid track), streamed.

Several runs (:func:`compare_runs`): their loss curves (and with a recording, displacement per step and freeze onset)
on shared plots, logged to a new "comparison" run.

Layout, locally under ``<run_dir>/analysis/`` and as MLflow artifacts under ``analysis/``::

    analysis/summary.txt                         the text summary of the latest analysis
    analysis/loss/loss_curve.{png,json,csv}
    analysis/<state>/                            final, initial or checkpoint-N
        norms.{json,csv}  norm_histogram.png  isotropy.{json,csv,png}  neighbours.{json,csv}  perplexity.{json,csv}
    analysis/dynamics/                           (dynamics-<dir> for a recording not named `recording`)
        recording.json  displacement.{json,csv}  freeze_verdict.{json,csv}  displacement_per_token.{json,csv}
        displacement_histogram.png  freeze_onset.{json,csv,png}  lattice_hops.{json,csv,png}  centroid.{json,csv,png}
    analysis/comparison/                         (on the comparison run)
        loss_curves.{png,json,csv}  runs.{json,csv}  [displacement_per_step.png  freeze_onset.png  dynamics_per_step.*]

Metrics are named ``analysis/...`` and logged at the analysed state's step (per-step dynamics at each step).
"""

from __future__ import annotations

from .compare import compare_runs
from .sections import (
    displacement_histogram,
    dynamics_lines,
    dynamics_outputs,
    isotropy_plot,
    probe_ids,
    static_analysis,
)
from .single import analyze_run
from .target import CUT_SHORT_TAG, NORM_STATS, AnalysisReport, AnalyzeOptions, Warn, default_recording, loss_history

__all__ = [
    "AnalysisReport",
    "AnalyzeOptions",
    "CUT_SHORT_TAG",
    "NORM_STATS",
    "Warn",
    "analyze_run",
    "compare_runs",
    "default_recording",
    "displacement_histogram",
    "dynamics_lines",
    "dynamics_outputs",
    "isotropy_plot",
    "loss_history",
    "probe_ids",
    "static_analysis",
]
