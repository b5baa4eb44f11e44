"""``wakelab analyze``: evaluate a run's embeddings and the dynamics of its recording, log plots, tables and
metrics to MLflow under ``analysis/`` and print a short summary. The work is in :mod:`wakelab.analysis.report`."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import WakelabError
from ..logs import warn


@click.command("analyze", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("runs", nargs=-1, metavar="RUN [RUN ...]")
@click.option(
    "--checkpoint",
    default=None,
    metavar="CKPT",
    help="Analyse this checkpoint of RUN: a path, a name (checkpoint-600) or a step (600). "
    "Passing a checkpoint folder as RUN does the same.",
)
@click.option("--initial", is_flag=True, help="Analyse the state right after init (before any training).")
@click.option(
    "--sample-size",
    type=click.IntRange(min=2),
    default=1000,
    show_default=True,
    help="Rows sampled (seeded) per group for isotropy.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the isotropy and default-probe samples.")
@click.option(
    "--probe",
    "probes",
    multiple=True,
    metavar="WORD",
    help="A token to probe for nearest neighbours (repeatable). Default: --num-probes seeded new tokens.",
)
@click.option(
    "--num-probes",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="How many new tokens to probe when no --probe is given.",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Neighbours listed per probe, among base and among new tokens.",
)
@click.option("--no-eval", is_flag=True, help="Do not recompute held-out perplexity; report the values the run logged.")
@click.option(
    "--eval-max-blocks",
    type=click.IntRange(min=1),
    default=None,
    help="Held-out blocks for perplexity (default: the run's train.eval_max_blocks).",
)
@click.option(
    "--no-static",
    is_flag=True,
    help="Skip the model-loading analyses (norms, isotropy, neighbours, perplexity): loss and dynamics only.",
)
@click.option(
    "--recording",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[PATH]",
    help="Also analyse the dynamics of a recording: PATH, or the run's own (<run_dir>/recording) when "
    "--recording comes last or is followed by another option.",
)
@click.option("--from-step", type=int, default=None, help="Displacement from this recorded step (default: the first).")
@click.option("--to-step", type=int, default=None, help="Displacement to this recorded step (default: the last).")
@click.option(
    "--freeze-threshold",
    type=float,
    default=1e-6,
    show_default=True,
    help="Rows whose mean displacement is below this are called frozen.",
)
@click.option(
    "--tokens",
    "trajectory_tokens",
    default="auto",
    show_default=True,
    metavar="SPEC",
    help="With --recording: tokens drawn with labels and trails in the trajectory: auto, all, sample:K, "
    "top:K (the largest movers) or a words file; the rest are drawn as a density.",
)
@click.option("--no-trajectory", is_flag=True, help="With --recording: skip the trajectory and the per-token table.")
@click.option("--nested", is_flag=True, help="Log to a new run nested under the analysed run instead of into it.")
@click.option("--no-mlflow", is_flag=True, help="Write the files locally only; log nothing to MLflow.")
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False),
    help="Local folder for the files (default: <run_dir>/analysis).",
)
@click.option(
    "--samples",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Text samples: greedy continuations of held-out prompts that hold new words (0: none).",
)
def analyze(runs, recording, **given):
    """Analyse a run: embedding norms, isotropy, nearest neighbours, loss, held-out perplexity, and with
    --recording the training dynamics (displacement, freeze verdict and onset, bf16 lattice hops, centroid).

    RUN is an MLflow run id, a run's output directory or a checkpoint folder. Plots (PNG), tables (JSON + CSV)
    and metrics go to that MLflow run under analysis/ (a new run when the id is unknown, or a nested one with
    --nested) and to <run_dir>/analysis/; a short summary is printed.

    With several RUNs, analyze compares them: their loss curves (and with --recording, mean displacement per step
    and freeze onset) are drawn on shared plots, logged to a NEW MLflow run tagged
    wakelab.analysis.kind=comparison (each compared run gets the tag wakelab.analysis.comparison_run) and written
    to <first run_dir>/analysis/comparison/. Run analyze on each run for its own analysis.

    \b
    Files (MLflow artifacts under analysis/, and in <run_dir>/analysis/):
      summary.txt                      the printed summary
      loss/loss_curve.{png,json,csv}
      <state>/                         final, initial or checkpoint-N: norms, norm_histogram, isotropy,
                                       neighbours, perplexity, samples (text from held-out prompts)
      dynamics/                        displacement, displacement_per_token, displacement_histogram,
                                       freeze_verdict, freeze_onset, lattice_hops, centroid
      trajectory/                      trajectory.html (step slider, hover), trajectory.gif, tokens.{csv,json}
                                       (per new word: frequency, norm, displacement, neighbours, frozen); frames
                                       as MLflow images under the key `trajectory` (the UI's image step slider)

    \b
    Example:
      wakelab analyze runs/demo
      wakelab analyze runs/demo --probe riverrun --probe moonbrook --top-k 5
      wakelab analyze runs/demo --checkpoint 600 --no-eval
      wakelab analyze runs/wordybird --no-static --recording
      wakelab analyze runs/demo --recording --tokens top:20
      wakelab analyze runs/wordybird --recording runs/wordybird/recording --from-step 10 --to-step 100
      wakelab analyze runs/lr-1e-3 runs/lr-1e-4 --recording
    """
    from ..analysis.report import analyze_run, compare_runs

    runs, recording = _targets(list(runs), recording, given)
    opts = _options(recording, given)
    from ..storage.writepoint import write_point

    again = "wakelab analyze " + " ".join(runs) + " (with the same options)"
    with write_point("analysis", opts.out or runs[0], intact="the run and its files are untouched", then=again):
        report = analyze_run(runs[0], opts, warn) if len(runs) == 1 else compare_runs(runs, opts, warn)
    click.echo(report.text)


#: Flags that say "no": ``--no-eval`` is ``AnalyzeOptions.evaluate=False``, and so on.
NEGATED = {"no_eval": "evaluate", "no_static": "static", "no_trajectory": "trajectory", "no_mlflow": "mlflow"}


def _options(recording, given: dict):
    """The command's options as AnalyzeOptions: every other option has the field's own name."""
    from ..analysis.report import AnalyzeOptions

    values = {NEGATED.get(name, name): (not value if name in NEGATED else value) for name, value in given.items()}
    return AnalyzeOptions(recording=recording, **(values | {"probes": tuple(values["probes"])}))


def _targets(runs: list, recording, given: dict) -> tuple[list, str | None]:
    """The runs to analyse (``analyze --recording RUN`` read as RUN), after the checks that need no run."""
    if not runs and recording and _is_run_dir(Path(recording)):
        runs, recording = [recording], ""  # `analyze --recording RUN`: the flag took the run as its PATH
    if not runs:
        raise WakelabError("give a run to analyse: an MLflow run id, a run's output directory or a checkpoint")
    if given["initial"] and given["checkpoint"]:
        raise WakelabError("--initial and --checkpoint choose different states; give one of them")
    if recording is None and (given["from_step"] is not None or given["to_step"] is not None):
        raise WakelabError("--from-step/--to-step choose steps of a recording; add --recording")
    if len(runs) > 1:
        flags = {"--checkpoint": "checkpoint", "--initial": "initial", "--probe": "probes", "--from-step": "from_step",
                 "--to-step": "to_step", "--nested": "nested"}  # fmt: skip
        ignored = [flag for flag, name in flags.items() if given[name] not in (None, False, ())]
        if ignored:
            warn(f"{', '.join(ignored)} apply to one run's analysis and are ignored when comparing runs")
    return runs, recording


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "config.yaml").is_file() or (path / "wakelab_run.json").is_file())
