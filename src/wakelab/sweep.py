"""``wakelab sweep``: one experiment under several values of one config key, compared side by side in MLflow.

Top to bottom: :func:`plan_sweep` resolves and checks everything up front (the key, every child's config, the init
plugins, the output folders, the constituents file), so bad input stops the sweep before any child starts. Then
:func:`run_sweep` opens the parent MLflow run (or attaches to ``MLFLOW_RUN_ID``, as under ``mlflow run``), and for
each value creates a child run tagged ``mlflow.parentRunId`` and runs ``engine.run`` inside it (passing the
child's ``run_id``; nothing goes through the environment), one child after another in this process. A child that
fails is marked FAILED and the others go on. Last, :func:`compare` reads each finished child back (the rows right
after init and at the end, its logged loss and norms) and logs the comparison to the parent under ``comparison/``:

    comparison.{csv,json,md}        one row per child: held-out perplexity before/after, final loss, mean new-row
                                    norm at step 0 and at the end, nearest-neighbour hit rates at step 0 and at the end
    comparison.html                 the table (first column fixed), the plots embedded, and the children's
                                    trajectories side by side in one shared projection under one step slider
    neighbours.json                 each evaluated word's top-k base-token neighbours at step 0 and at the end
    loss_curves.png  perplexity.png  new_row_norm.png  hit_rates.png

Hit rate: for each word of the constituents file that is a new token, its top-k base-token neighbours by cosine;
a hit is the meaning word (``hit_meaning``), or the meaning word or one of the words it blends (``hit_any``), among
them. The step-0 rates show what the init alone gives (``subword`` starts each word at its pieces, so its step-0
neighbours partly reflect the init itself); the final rates what training added.
"""

from __future__ import annotations

import csv
import difflib
import gc
import html
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import logs, registry, stopping, sweep_resume, tracking
from .config import RunConfig, parse_value, plugin_section, resolve_key, set_in, validate
from .errors import ConfigError, DataError, WakelabError
from .logs import warn
from .vocab import word_token_id
from .writepoint import published_dir, write_point

#: Keys a sweep cannot vary, and why.
FIXED_KEYS = {
    "preset": "a preset is a whole config; sweep over a key, or run one sweep per preset",
    "output_dir": "each child gets <output_dir>/<key>=<value>; set the sweep's folder with --output-dir",
    "tracking.experiment": "the children live in the parent's experiment; set it with --experiment",
    "tracking.run_name": "the children are named <key>=<value>; name the parent with --run-name",
}
COMPARISON_DIR = "comparison"
SWEEP_TAG = "wakelab.sweep"

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------------------------------
# The plan: everything checked before any child starts


@dataclass
class Child:
    """One value of the swept key and what became of its run."""

    label: str
    text: str
    config: RunConfig
    run_id: str | None = None
    status: str = "PENDING"
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def output_dir(self) -> Path:
        return self.config.resolved_output_dir


@dataclass
class SweepPlan:
    key: str
    canonical: str
    base: RunConfig
    root: Path
    children: list[Child]
    constituents_path: Path | None = None
    constituents: dict[str, list[str]] = field(default_factory=dict)
    not_in_lexicon: list[str] = field(default_factory=list)
    top_k: int = 10
    over: tuple[str, ...] = ()  # the --over specs as given (``--resume`` plans the sweep again from them)
    evaluate: bool = False  # run ``wakelab evaluate`` (against the base) on each finished child


def split_values(text: str) -> list[str]:
    """``a,b,[c,d]`` -> ``["a", "b", "[c,d]"]``: commas inside brackets or quotes do not split."""
    values, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    values.append("".join(current).strip())
    return values


def parse_over(spec: str) -> tuple[str, list[str]]:
    """``key=v1,v2,...`` -> ``(key, [v1, v2, ...])``, with one-line errors for what cannot be a sweep."""
    if "=" not in spec:
        raise ConfigError(f"--over '{spec}' must be key=value1,value2,..., e.g. --over init=spherical,mean,subword")
    key, text = (part.strip() for part in spec.split("=", 1))
    values = split_values(text)
    if not key or not text or any(not v for v in values):
        raise ConfigError(f"--over '{spec}': give a key and comma-separated values, e.g. --over lr=1e-3,5e-3")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(f"--over '{spec}': {', '.join(repeated)} given more than once")
    return key, values


def _dir_name(label: str) -> str:
    return "".join("_" if ch in "/\\" or ch.isspace() or ch in ':*?"<>|' else ch for ch in label)


def child_configs(base: RunConfig, key: str, canonical: str, texts: list[str], root: Path) -> list[Child]:
    """Every child's validated config: the base with ``canonical`` set, in its own ``<root>/<key>=<value>``."""
    children, seen = [], {}
    for text in texts:
        label = f"{key}={text}"
        tree = base.model_dump(mode="json")
        value = parse_value(text)
        set_in(tree, canonical, value)
        tree["output_dir"] = str(root / _dir_name(label))
        tree.setdefault("tracking", {})["run_name"] = label
        try:
            # explicit: a plugin key whose plugin is not active is an error (it would be ignored), as with --set
            config = validate(tree, explicit={canonical.split(".", 1)[0]})
        except ConfigError as exc:
            raise ConfigError(f"--over {label}: {exc}") from None
        resolved = json.dumps(config.flat().get(canonical), default=str)
        if resolved in seen:
            raise ConfigError(f"--over {key}: {seen[resolved]} and {text} are the same value ({resolved})")
        seen[resolved] = text
        children.append(Child(label, text, config))
    names = [c.output_dir for c in children]
    if len(set(names)) != len(names):
        raise ConfigError(f"--over {key}: two values map to the same output folder name; use distinct values")
    return children


def crossed_configs(base: RunConfig, axes: list[tuple[str, str, list[str]]], root: Path) -> list[Child]:
    """One child per combination of several keys' values, labelled ``k1=v1,k2=v2``."""
    import itertools

    children = []
    for combo in itertools.product(*(texts for _, _, texts in axes)):
        label = ",".join(f"{key}={text}" for (key, _, _), text in zip(axes, combo, strict=False))
        tree = base.model_dump(mode="json")
        for (_, canonical, _), text in zip(axes, combo, strict=False):
            set_in(tree, canonical, parse_value(text))
        tree["output_dir"] = str(root / _dir_name(label))
        tree.setdefault("tracking", {})["run_name"] = label
        try:
            config = validate(tree)
        except ConfigError as exc:
            raise ConfigError(f"--over {label}: {exc}") from None
        children.append(Child(label, ",".join(combo), config))
    return children


def check_init_methods(children: list[Child], cwd: Path | None) -> None:
    """Each child's init.method is answered by a plugin that exists (a typo stops the sweep, not one child)."""
    available = registry.discover(cwd)
    for child in children:
        config = child.config
        if config.vocab.lexicon is None:
            continue
        method = config.init.method
        pm = registry.build_manager(config.active_plugins, cwd, optional=[method])
        answering = {impl.plugin_name for impl in pm.hook.init_embeddings.get_hookimpls()}
        if method in answering or (method not in available and answering):
            continue
        known = sorted(name for name, source in available.items() if _implements_init(source))
        why = f"plugin '{method}' has no init_embeddings hook" if method in available else f"no plugin named '{method}'"
        near = difflib.get_close_matches(method, known, n=1)
        why += f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(
            f"--over {child.label}: init.method={method}: {why}; init plugins found: {', '.join(known) or 'none'} "
            "(or activate your own with --plugin NAME|PATH)"
        )


def _implements_init(source) -> bool:
    try:
        module = source.load()
    except WakelabError:
        return False
    return callable(getattr(module, "init_embeddings", None))


def check_output_dirs(children: list[Child], overwrite: bool) -> None:
    from .engine import RUN_FILE

    taken = [c for c in children if (c.output_dir / RUN_FILE).exists() or any(c.output_dir.glob("checkpoint-*"))]
    if taken and not overwrite:
        raise ConfigError(
            f"{taken[0].output_dir} already holds a run ({len(taken)} of the sweep's {len(children)} folders do); "
            "pass --overwrite to replace them, or choose another --output-dir"
        )


def resolve_constituents(base: RunConfig, given: str | None) -> Path | None:
    """The constituents file: --constituents, else init.constituents, else the demo's when the lexicon is the demo's."""
    name = given or base.init.constituents
    if name is None and base.vocab.lexicon == "demo":
        name = "demo"
    if name is None:
        return None
    if name == "demo":
        from .demo import ensure_demo_texts

        return ensure_demo_texts().constituents
    path = Path(name)
    if not path.is_file():
        raise DataError(f"constituents file not found: {path} (--constituents / init.constituents)")
    return path


def load_constituents(path: Path, children: list[Child], log: Log) -> tuple[dict[str, list[str]], list[str]]:
    """The constituents of lexicon words, and the words of the file that no child's lexicon holds (reported)."""
    from .data import resolve_lexicon
    from .demo_text import read_constituents
    from .vocab import read_lexicon

    table = read_constituents(path)
    lexicon: set[str] = set()
    for path_ in {resolve_lexicon(c.config) for c in children if c.config.vocab.lexicon is not None}:
        lexicon.update(read_lexicon(path_))
    missing = [word for word in table if word not in lexicon]
    kept = {word: parts for word, parts in table.items() if word in lexicon}
    if not kept:
        raise DataError(
            f"constituents file {path}: none of its {len(table)} words is in the lexicon; give the file that goes "
            "with this lexicon (--constituents)"
        )
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        log(
            f"warning: constituents file {path}: {len(missing)} of {len(table)} words are not in the lexicon and "
            f"are left out of the hit rates: {shown}"
        )
    return kept, missing


def plan_sweep(
    base: RunConfig,
    over: str | list[str] | tuple[str, ...],
    *,
    constituents: str | None = None,
    top_k: int = 10,
    overwrite: bool = False,
    cwd: Path | None = None,
    log: Log = logs.log,
) -> SweepPlan:
    """Resolve and check the whole sweep; raises a one-line ``WakelabError`` before anything runs.

    Several ``over`` specs cross their values: one child per combination."""
    axes = []
    for spec in [over] if isinstance(over, str) else list(over):
        key, texts = parse_over(spec)
        try:
            canonical = key.strip() if plugin_section(key) else resolve_key(key)  # a plugin's key: checked per child
        except ConfigError as exc:
            raise ConfigError(f"--over {spec}: {exc}") from None
        if canonical in FIXED_KEYS:
            raise ConfigError(f"--over {key}: {FIXED_KEYS[canonical]}")
        if canonical in [a[1] for a in axes]:
            raise ConfigError(f"--over {key}: the key is swept twice; give its values in one --over")
        axes.append((key, canonical, texts))
    if not axes:
        raise ConfigError("--over: give a key and its values, e.g. --over init=spherical,mean,subword")
    if top_k < 1:
        raise ConfigError(f"--top-k {top_k}: give at least 1")
    root = base.resolved_output_dir
    if len(axes) == 1:
        key, canonical, texts = axes[0]
        children = child_configs(base, key, canonical, texts, root)
    else:
        key, canonical = "+".join(a[0] for a in axes), ",".join(a[1] for a in axes)
        children = crossed_configs(base, axes, root)
    check_init_methods(children, cwd)
    check_output_dirs(children, overwrite)
    plan = SweepPlan(
        key, canonical, base, root, children, top_k=top_k, over=tuple([over] if isinstance(over, str) else over)
    )
    plan.constituents_path = resolve_constituents(base, constituents)
    if plan.constituents_path is not None:
        plan.constituents, plan.not_in_lexicon = load_constituents(plan.constituents_path, children, log)
    return plan


# ----------------------------------------------------------------------------------------------------------------------
# Running: a parent run, and one child run after another


@dataclass
class SweepResult:
    parent_run_id: str
    experiment_id: str
    children: list[Child]
    comparison_dir: Path
    table: str
    tracking_uri: str

    @property
    def failed(self) -> list[Child]:
        return [c for c in self.children if c.status != "FINISHED"]


def _open_parent(client, plan: SweepPlan, cwd: Path | None) -> tuple[str, str, bool]:
    """The parent run: the one ``MLFLOW_RUN_ID`` names (``mlflow run``), else a new one.

    Returns (run id, experiment id, attached)."""
    tags = {
        SWEEP_TAG: "parent",
        "wakelab.sweep.key": plan.canonical,
        "wakelab.sweep.values": ",".join(c.text for c in plan.children),
        "wakelab.output_dir": str(plan.root.resolve()),
        **tracking.run_tags(plan.base.preset, cwd),
    }
    attach = os.environ.get("MLFLOW_RUN_ID")
    if attach:
        run = client.get_run(attach)
        for key, value in tags.items():
            client.set_tag(attach, key, value)
        return attach, run.info.experiment_id, True
    experiment_id = tracking.ensure_experiment(plan.base.tracking.experiment)
    name = plan.base.tracking.run_name or f"sweep-{plan.key}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    return run.info.run_id, experiment_id, False


def _log_parent_params(client, run_id: str, plan: SweepPlan) -> None:
    params = {
        "sweep.key": plan.canonical,
        "sweep.values": ",".join(c.text for c in plan.children),
        "sweep.children": len(plan.children),
        "sweep.top_k": plan.top_k,
        "sweep.constituents": str(plan.constituents_path) if plan.constituents_path else "None",
        **{k: v for k, v in plan.base.flat().items() if k not in plan.canonical.split(",")},
    }
    tracking.log_new_params(client, run_id, params)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def run_child(
    client,
    child: Child,
    parent_id: str,
    experiment_id: str,
    *,
    overwrite: bool,
    progress: bool,
    cwd: Path | None,
    resume_from: str | None = None,
) -> None:
    """Run one child inside its own MLflow run, nested under the parent; a failure is recorded, not raised.

    ``resume_from``: a checkpoint of the child's earlier, stopped run (``child.run_id``), continued in that run."""
    from . import engine

    if resume_from is None or child.run_id is None:
        run = client.create_run(
            experiment_id,
            run_name=child.label,
            tags={
                "mlflow.parentRunId": parent_id,
                SWEEP_TAG: "child",
                "wakelab.sweep.parent": parent_id,
                "wakelab.sweep.key": child.label.split("=", 1)[0],
                "wakelab.sweep.value": child.text,
            },
        )
        child.run_id, resume_from = run.info.run_id, None
    try:
        result = engine.run(
            child.config,
            overwrite=overwrite and resume_from is None,
            resume_from=resume_from,
            progress=progress,
            cwd=cwd,
            run_id=child.run_id,
        )
        # A resumed child's run holds what its first part logged too (held-out perplexity before, ...).
        child.status = "FINISHED"
        child.metrics = {**(dict(client.get_run(child.run_id).data.metrics) if resume_from else {}), **result.metrics}
    except KeyboardInterrupt:
        child.status, child.error = "KILLED", "interrupted"
        _close_child(client, child)
        raise
    except Exception as exc:  # noqa: BLE001 - one child's failure must not stop the others
        child.status, child.error = "FAILED", _one_line(exc)
        warn(f"sweep: {child.label} failed: {child.error}")
        _close_child(client, child)
    finally:
        gc.collect()


def _close_child(client, child: Child) -> None:
    """Mark a child that did not finish; the engine closed it already unless it failed before opening it."""
    try:
        client.set_tag(child.run_id, "wakelab.sweep.status", child.status.lower())
        if child.error:
            client.set_tag(child.run_id, "wakelab.error", tracking.tag_value(child.error))
        if client.get_run(child.run_id).info.status == "RUNNING":
            client.set_terminated(child.run_id, child.status)
    except Exception as exc:  # noqa: BLE001 - the tracking store blipped; say so and go on
        warn(f"could not mark child run {child.run_id} {child.status}: {exc}")


@stopping.handles_signals  # a stop signal ends the running child and the parent KILLED; --resume goes on
def run_sweep(
    plan: SweepPlan,
    *,
    overwrite: bool = False,
    progress: bool = True,
    cwd: Path | None = None,
    log: Log = logs.log,
    resume: sweep_resume.SavedSweep | None = None,
) -> SweepResult:
    """Run every child of ``plan`` under one parent run and log the comparison to the parent.

    ``resume``: the saved sweep being resumed; its parent run is reopened, finished children are kept, a stopped
    one continues from its checkpoint, the others run."""
    tracking.check_reachable()
    client = tracking.mlflow_client()
    started = time.monotonic()
    if resume is None:
        parent_id, experiment_id, attached = _open_parent(client, plan, cwd)
    else:
        parent_id, experiment_id, attached = resume.parent_run_id, resume.experiment_id, False
        sweep_resume.reopen_parent(client, parent_id)
    status, failure = "FINISHED", None
    try:
        sweep_resume.save_sweep_file(plan, parent_id, experiment_id)
        _log_parent_params(client, parent_id, plan)
        for number, child in enumerate(plan.children, start=1):
            checkpoint = sweep_resume.prepare_child(client, child) if resume is not None else None
            if child.status == "FINISHED":
                log(f"sweep: child {number}/{len(plan.children)}: {child.label} finished before; kept")
                continue
            how = f" (continuing from {checkpoint})" if checkpoint else ""
            log(f"sweep: child {number}/{len(plan.children)}: {child.label} -> {child.output_dir}{how}")
            run_child(
                client,
                child,
                parent_id,
                experiment_id,
                overwrite=overwrite or resume is not None,
                progress=progress,
                cwd=cwd,
                resume_from=checkpoint,
            )
            stopping.current().raise_if_signalled(f"as {child.label} finished")  # it came after its last step
        comparison_dir, table = compare(client, plan, parent_id, log)
        if "train.precision" in plan.canonical.split(","):
            from .precision_report import compare_precision

            table += compare_precision(client, plan, parent_id, comparison_dir, log)
        failed = [c.label for c in plan.children if c.status != "FINISHED"]
        client.set_tag(parent_id, "wakelab.sweep.failed_children", ",".join(failed))
        client.log_metric(parent_id, "sweep_children_finished", len(plan.children) - len(failed))
        client.log_metric(parent_id, "sweep_children_failed", len(failed))
        client.log_metric(parent_id, "sweep_seconds", time.monotonic() - started)
        if len(failed) == len(plan.children):
            status = "FAILED"
    except BaseException as exc:  # noqa: BLE001 - the parent must end FAILED or KILLED, never RUNNING
        status, failure = tracking.status_for(exc), exc
        if isinstance(exc, KeyboardInterrupt):
            running = next((c.label for c in plan.children if c.status == "KILLED"), None)
            raise stopping.Stopped(
                getattr(exc, "signum", 2),
                f"sweep stopped{' by ' + stopping.signal_name(exc.signum) if hasattr(exc, 'signum') else ''}; "
                f"{'the parent run and ' + running + ' are' if running else 'the parent run is'} marked KILLED; "
                f"continue with: wakelab sweep --resume {parent_id}",
            ) from None
        raise
    finally:
        stopping.current().closing()  # a signal now must not leave the parent RUNNING
        _end_parent(client, parent_id, status, failure, attached)
    return SweepResult(parent_id, experiment_id, plan.children, comparison_dir, table, tracking.tracking_uri())


def _end_parent(client, run_id: str, status: str, failure: BaseException | None, attached: bool) -> None:
    try:
        if failure is not None and not isinstance(failure, KeyboardInterrupt):
            client.set_tag(run_id, "wakelab.error", tracking.tag_value(_one_line(failure)))
        # Under `mlflow run` the run belongs to it: it marks the run when this process exits.
        if not attached or status != "FINISHED":
            client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001
        warn(f"could not close the sweep's parent run {run_id}: {exc}")


# ----------------------------------------------------------------------------------------------------------------------
# The comparison


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token as the word it spells: decoded, stripped, lower case."""
    return [tokenizer.decode([int(i)]).strip().lower() for i in ids]


def hit_rates(weight: torch.Tensor, tokenizer, num_base: int, constituents: dict[str, list[str]], k: int) -> dict:
    """Share of the constituents' new words whose top-k base neighbours hold the meaning word (or a part)."""
    from .analysis.embeddings import nearest_neighbours

    vocab = tokenizer.get_vocab()
    token_of = {w: word_token_id(vocab, w) for w in constituents}
    words = [w for w in constituents if token_of[w] is not None and token_of[w] >= num_base]
    if not words:
        return {"words": 0, "skipped": len(constituents), "hit_meaning": None, "hit_any": None, "details": []}
    ids = [token_of[w] for w in words]
    neighbours = nearest_neighbours(weight, ids, range(num_base), k=k)
    details, meaning_hits, any_hits = [], 0, 0
    for word, found in zip(words, neighbours, strict=True):
        texts = token_texts(tokenizer, [i for i, _ in found])
        meaning, *parts = (w.lower() for w in constituents[word])
        hit_meaning = meaning in texts
        hit_any = hit_meaning or any(p in texts for p in parts)
        meaning_hits += hit_meaning
        any_hits += hit_any
        details.append(
            {
                "word": word,
                "meaning": meaning,
                "parts": parts,
                "neighbours": texts,
                "hit_meaning": hit_meaning,
                "hit_any": hit_any,
            }
        )
    return {
        "words": len(words),
        "skipped": len(constituents) - len(words),
        "hit_meaning": meaning_hits / len(words),
        "hit_any": any_hits / len(words),
        "details": details,
    }


class StackedRows:
    """Base rows and new rows read as one ``[vocab, d]`` float32 matrix without building it: a copy of the whole
    matrix for each end of each child was 2 x 1.35 GiB at P1 (the sweep peaked at 1.8x its children's run). Slices
    and index tensors, which is how the neighbour search and the norms read it."""

    def __init__(self, base: torch.Tensor, new: torch.Tensor):
        self.base, self.new = base, new
        self.shape = (base.shape[0] + new.shape[0], base.shape[1])

    def __getitem__(self, index) -> torch.Tensor:
        n = self.base.shape[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step != 1:
                raise IndexError("StackedRows takes contiguous slices only")
            if stop <= n:
                return self.base[start:stop].float()
            if start >= n:
                return self.new[start - n : stop - n]
            return torch.cat([self.base[start:n].float(), self.new[: stop - n]])
        index = torch.as_tensor(index)
        out = torch.empty(*index.shape, self.shape[1])
        is_new = index >= n
        out[~is_new] = self.base[index[~is_new]].float()
        out[is_new] = self.new[index[is_new] - n]
        return out


def child_states(child: Child) -> tuple[StackedRows, StackedRows, Any, int]:
    """The child's embedding rows right after init and at the end (float32), its tokenizer and base size."""
    from safetensors.torch import load_file

    from .state import load_trained, rows_file

    state = load_trained(child.output_dir, initial=True)
    rows = state.rows
    num_base = rows.num_base
    base = rows.values(range(num_base), share=True)  # frozen: the same at both ends, so read in place
    new_ids = range(num_base, rows.num_total)
    initial = StackedRows(base, rows.values(new_ids).float().clone())
    path, _ = rows_file(child.output_dir)
    saved = load_file(str(path))
    rows.load_rows(saved["token_ids"], saved["rows"])
    final = StackedRows(base, rows.values(new_ids).float().clone())
    tokenizer = state.tokenizer
    del state, rows
    gc.collect()
    return initial, final, tokenizer, num_base


def summarise_child(client, child: Child, plan: SweepPlan, log: Log) -> dict[str, Any]:
    """Everything the comparison shows of one finished child; hit rates also go to the child run as metrics."""
    from .analysis.report import loss_history

    summary: dict[str, Any] = {"loss": None, "norm_curve": None, "neighbours": None}
    history = loss_history(child.run_id, child.output_dir, client)
    if history is not None:
        summary["loss"] = (history[0], history[1])
    norms = sorted(client.get_metric_history(child.run_id, "new_row_norm"), key=lambda m: (m.step, m.timestamp))
    steps = {m.step: m.value for m in norms}
    initial, final, tokenizer, num_base = child_states(child)
    last_step = max([child.config.train.max_steps, *steps])
    init_norm = float(initial[num_base:].norm(dim=1).mean()) if initial.shape[0] > num_base else math.nan
    steps[0] = init_norm
    summary["norm_curve"] = (sorted(steps), [steps[s] for s in sorted(steps)])
    summary["base_mean_norm"] = float(initial[:num_base].norm(dim=1).mean())
    summary["new_row_norm_init"] = init_norm
    summary["new_row_norm_final"] = child.metrics.get("new_row_norm", float(final[num_base:].norm(dim=1).mean()))
    logged = client.get_run(child.run_id).data.metrics  # the trajectory plugin's meaning probe, when it ran
    summary["probe"] = {k: logged[k] for k in PROBE_KEYS if k in logged}
    summary["init_seconds"] = logged.get("init/seconds")
    if plan.evaluate:
        summary["evaluate"] = evaluate_child(child, log)
    if child.config.init.from_embeddings:
        log(
            f"warning: {child.label}: init.from_embeddings is set; step-0 values are those of the init before the "
            "restore"
        )
    if plan.constituents:
        at_init = hit_rates(initial, tokenizer, num_base, plan.constituents, plan.top_k)
        at_end = hit_rates(final, tokenizer, num_base, plan.constituents, plan.top_k)
        summary["hits"] = {"step0": at_init, "final": at_end}
        if at_init["words"]:
            client.log_batch(child.run_id, metrics=_hit_metrics(at_init, 0) + _hit_metrics(at_end, last_step))
        if at_init["skipped"]:
            log(
                f"warning: {child.label}: {at_init['skipped']} constituents words are not new tokens of this run "
                "(already single tokens) and are left out of its hit rates"
            )
    return summary


def evaluate_child(child: Child, log: Log) -> dict[str, Any]:
    """``wakelab evaluate`` on one child against the base (a run nested under the child): the comparison's figures."""
    from .analysis.evaluate import EvaluateOptions, evaluate_run

    report = evaluate_run(str(child.output_dir), EvaluateOptions(attach_outer=False), warn)
    log(f"{child.label}: evaluated ({report.run_id}): {report.results['verdict']}")
    r = report.results
    trained, base = r["profiles"].get("trained", {}), r["profiles"].get("base", {})
    after = (r["class_split"].get("after") or {}).get("new") or {}
    cost = r["reference_cost"] or {}
    probe = r.get("probe") or {}
    return {"eval_coined_per_1k": trained.get("coined_per_1k"),
            "eval_corpus_coined_per_1k": r["corpus"]["coined_per_1k"],
            "eval_delta_corpus": trained.get("delta_corpus"), "eval_base_delta_corpus": base.get("delta_corpus"),
            "eval_new_ppl_after": after.get("perplexity"), "eval_reference_loss_increase": cost.get("loss_increase"),
            "probe_auc_before": probe.get("probe_auc_before"), "probe_auc_after": probe.get("probe_auc_after"),
            "eval_run_id": report.run_id}  # fmt: skip


def _hit_metrics(rates: dict, step: int) -> list:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    return [Metric(f"neighbour_hit_{kind}", float(rates[f"hit_{kind}"]), stamp, step) for kind in ("meaning", "any")]


COLUMNS = (
    ("child", "child"),
    ("status", "status"),
    ("heldout_alias_mse_before", "hidden dist step 0"),
    ("heldout_perplexity_before", "ppl before"),
    ("heldout_perplexity_after", "ppl after"),
    ("final_loss", "final loss"),
    ("new_row_norm_init", "new-row norm step 0"),
    ("new_row_norm_final", "new-row norm end"),
    ("base_mean_norm", "base-row norm"),
    ("new_row_displacement", "displacement"),
    ("hit_meaning_step0", "meaning@k step 0"),
    ("hit_meaning_final", "meaning@k end"),
    ("hit_any_step0", "meaning/part@k step 0"),
    ("hit_any_final", "meaning/part@k end"),
    ("hit_words", "words scored"),
    ("probe_kl_before", "probe KL step 0"),
    ("probe_kl_after", "probe KL end"),
    ("probe_substitution_after", "substitution end"),
    ("init_seconds", "init s"),
    ("probe_auc_before", "probe AUC step 0"),
    ("probe_auc_after", "probe AUC end"),
    ("eval_coined_per_1k", "coined/1k (evaluate)"),
    ("eval_corpus_coined_per_1k", "corpus coined/1k"),
    ("eval_delta_corpus", "Delta to corpus"),
    ("eval_base_delta_corpus", "base Delta to corpus"),
    ("eval_new_ppl_after", "ppl new-word targets"),
    ("eval_reference_loss_increase", "ordinary-text cost (nats)"),
    ("train_seconds", "seconds"),
    ("run_id", "run id"),
    ("error", "error"),
)


PROBE_KEYS = ("probe_kl_before", "probe_kl_after", "probe_substitution_after", "probe_auc_before", "probe_auc_after")


def comparison_row(child: Child) -> dict[str, Any]:
    row: dict[str, Any] = {key: None for key, _ in COLUMNS}
    row.update(child=child.label, status=child.status, run_id=child.run_id, error=child.error, value=child.text)
    for key in (
        "heldout_alias_mse_before",
        "heldout_perplexity_before",
        "heldout_perplexity_after",
        "new_row_displacement",
        "train_seconds",
    ):
        row[key] = child.metrics.get(key)
    summary = child.summary
    if summary.get("loss"):
        row["final_loss"] = summary["loss"][1][-1]
    for key in ("new_row_norm_init", "new_row_norm_final", "base_mean_norm", "init_seconds"):
        row[key] = summary.get(key)
    row.update(summary.get("probe") or {})
    row.update({k: v for k, v in (summary.get("evaluate") or {}).items() if k in dict(COLUMNS) and v is not None})
    hits = summary.get("hits")
    if hits:
        for when in ("step0", "final"):
            for kind in ("meaning", "any"):
                row[f"hit_{kind}_{when}"] = hits[when][f"hit_{kind}"]
        row["hit_words"] = hits["final"]["words"]
    return row


def _fmt(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if key.startswith("hit_") and key != "hit_words":
        return f"{value:.0%}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table_markdown(rows: list[dict], plan: SweepPlan, shown: tuple[str, ...]) -> str:
    header = [label.replace("@k", f"@{plan.top_k}") for key, label in COLUMNS if key in shown]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for row in rows:
        cells = [_fmt(key, row.get(key)).replace("|", "\\|") for key, _ in COLUMNS if key in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_html(rows: list[dict], plan: SweepPlan, shown: tuple[str, ...]) -> str:
    """The comparison table as one ``<table>`` element (the page around it is :mod:`.analysis.sweep_page`'s)."""
    header = "".join(
        f"<th>{html.escape(label.replace('@k', f'@{plan.top_k}'))}</th>" for key, label in COLUMNS if key in shown
    )
    body = []
    for row in rows:
        style = "" if row["status"] == "FINISHED" else ' style="color:#b00"'
        cells = "".join(f"<td>{html.escape(_fmt(key, row.get(key)))}</td>" for key, _ in COLUMNS if key in shown)
        body.append(f"<tr{style}>{cells}</tr>")
    return f"<table><tr>{header}</tr>{''.join(body)}</table>"


def comparison_html(rows: list[dict], plan: SweepPlan, shown: tuple[str, ...], notes: list[str], out: Path,
                    log: Log) -> str:  # fmt: skip
    """The comparison page: the table (first column fixed), the children's trajectories side by side in one shared
    projection under one slider (refused in one line when the children's base models differ), the plots embedded."""
    from .analysis.sweep_page import ChildTrajectory, comparison_page, side_by_side

    done = [ChildTrajectory(c.label, c.output_dir, str(c.config.model.name_or_path))
            for c in plan.children if c.status == "FINISHED"]  # fmt: skip
    runs, refused = side_by_side(done, warn) if done else ([], "no child finished: nothing to show side by side")
    if refused:
        log(f"warning: {refused}")
    plots = [out / f"{name}.png" for name in PLOTS]
    return comparison_page(f"Sweep over {plan.canonical}", table_html(rows, plan, shown), notes, plots, runs, refused)


PLOTS = ("loss_curves", "perplexity", "new_row_norm", "hit_rates")


def notes_for(plan: SweepPlan) -> list[str]:
    notes = []
    missing = [c for c in plan.children if c.status != "FINISHED"]
    if missing:
        notes.append("missing (no results): " + "; ".join(f"{c.label} {c.status}: {c.error}" for c in missing))
    if plan.constituents:
        notes.append(
            f"hit rates: share of the {len(plan.constituents)} constituents words whose top-{plan.top_k} base-token "
            "neighbours (cosine) hold the meaning word (meaning@k), or the meaning word or a word it blends "
            "(meaning/part@k); step 0 = right after init (subword init starts a word at its own pieces, so its "
            "step-0 neighbours partly reflect the init), end = after training."
        )
        if plan.not_in_lexicon:
            notes.append(f"left out of the hit rates (not in the lexicon): {', '.join(plan.not_in_lexicon)}")
    else:
        notes.append("no constituents file (--constituents / init.constituents): no hit rates")
    return notes


def compare(client, plan: SweepPlan, parent_id: str, log: Log) -> tuple[Path, str]:
    """Summarise every finished child, write the comparison files and plots, and log them to the parent."""
    out = plan.root / COMPARISON_DIR
    for child in plan.children:
        if child.status != "FINISHED":
            continue
        try:
            child.summary = summarise_child(client, child, plan, log)
        except Exception as exc:  # noqa: BLE001 - a child's analysis failing leaves a gap, not a lost sweep
            warn(f"could not read back {child.label} for the comparison: {_one_line(exc)}")
            child.summary = {}
    rows = [comparison_row(c) for c in plan.children]
    shown = tuple(
        key
        for key, _ in COLUMNS
        if key != "run_id" and (key in ("child", "status") or any(r.get(key) is not None for r in rows))
    )
    notes = notes_for(plan)
    markdown = table_markdown(rows, plan, shown)
    meta = {
        "key": plan.canonical,
        "values": [c.text for c in plan.children],
        "parent_run_id": parent_id,
        "top_k": plan.top_k,
        "constituents": str(plan.constituents_path) if plan.constituents_path else None,
        "constituents_not_in_lexicon": plan.not_in_lexicon,
        "missing": [c.label for c in plan.children if c.status != "FINISHED"],
        "notes": notes,
        "children": rows,
    }
    # A full disk: one line, and the comparison folder whole (the one before) or absent, never half-written.
    with (
        write_point(
            "sweep-comparison",
            out,
            intact=f"every child's run, checkpoints and final rows are intact; {out} is as it was",
            then=f"wakelab sweep --resume {parent_id}",
        ),
        published_dir(out) as folder,
    ):
        (folder / "comparison.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        with (folder / "comparison.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[key for key, _ in COLUMNS] + ["value"])
            writer.writeheader()
            writer.writerows(rows)
        (folder / "comparison.md").write_text(
            f"# Sweep over `{plan.canonical}`\n\n{markdown}\n" + "".join(f"- {n}\n" for n in notes)
        )
        neighbours = {
            c.label: {when: c.summary["hits"][when]["details"] for when in ("step0", "final")}
            for c in plan.children
            if c.summary.get("hits")
        }
        (folder / "neighbours.json").write_text(json.dumps(neighbours, indent=1, ensure_ascii=False) + "\n")
        write_plots(plan, folder)
        (folder / "comparison.html").write_text(
            comparison_html(rows, plan, shown, notes, folder, log), encoding="utf-8"
        )
    client.log_artifacts(parent_id, str(out), COMPARISON_DIR)
    return out, markdown


def write_plots(plan: SweepPlan, out: Path) -> None:
    from .analysis import plots

    done = [c for c in plan.children if c.status == "FINISHED" and c.summary]
    missing = [c.label for c in plan.children if c not in done]
    suffix = f"\n(missing: {', '.join(missing)})" if missing else ""

    fig = plots.curves(
        {c.label: c.summary["loss"] for c in done if c.summary.get("loss")},
        f"Training loss per child ({plan.canonical}){suffix}",
    )
    plots.save_figure(fig, out / "loss_curves.png")

    fig = plots.curves(
        {c.label: c.summary["norm_curve"] for c in done if c.summary.get("norm_curve")},
        f"Mean new-row norm (step 0 = right after init){suffix}",
        ylabel="mean L2 norm of the new rows",
    )
    base = [c.summary["base_mean_norm"] for c in done if c.summary.get("base_mean_norm") is not None]
    if base:
        ax = fig.axes[0]
        ax.axhline(base[0], color="gray", linestyle="--", label="mean base-row norm")
        ax.legend(loc="best")
    plots.save_figure(fig, out / "new_row_norm.png")

    labels = [c.label for c in done]
    before = [c.metrics.get("heldout_perplexity_before", math.nan) for c in done]
    after = [c.metrics.get("heldout_perplexity_after", math.nan) for c in done]
    fig = _bars(
        labels,
        {"before training": before, "after training": after},
        f"Held-out perplexity{suffix}",
        "perplexity (log scale)",
        log_scale=True,
    )
    plots.save_figure(fig, out / "perplexity.png")

    if plan.constituents:
        series: dict[str, list[float]] = {}
        for kind, name in (("meaning", "meaning word"), ("any", "meaning word or a part")):
            for when, when_name in (("step0", "step 0"), ("final", "end")):
                series[f"{name}, {when_name}"] = [
                    (c.summary.get("hits") or {}).get(when, {}).get(f"hit_{kind}") or 0.0 for c in done
                ]
        fig = _bars(
            labels,
            series,
            f"Nearest-neighbour hit rate (top {plan.top_k} base tokens){suffix}",
            "share of words with a hit",
            ylim=(0, 1.05),
            percent=True,
        )
        plots.save_figure(fig, out / "hit_rates.png")


def _bars(
    labels: list[str],
    series: dict[str, list[float]],
    title: str,
    ylabel: str,
    *,
    log_scale: bool = False,
    ylim: tuple[float, float] | None = None,
    percent: bool = False,
):
    import numpy as np

    from .analysis.plots import new_figure

    fig, (ax,) = new_figure(width=max(7.0, 1.6 * max(len(labels), 1) * max(len(series), 1) / 2))
    x = np.arange(len(labels))
    width = 0.8 / max(len(series), 1)
    for index, (name, values) in enumerate(series.items()):
        bars = ax.bar(x + (index - (len(series) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(
            bars,
            labels=[("—" if math.isnan(v) else f"{v:.0%}" if percent else f"{v:.3g}") for v in values],
            fontsize=8,
            padding=2,
        )
    ax.set_xticks(x, labels)
    ax.set_title(title)
    ax.set_xlabel("child run")
    finite = [v for vs in series.values() for v in vs if not math.isnan(v) and v > 0]
    if log_scale and finite and max(finite) / min(finite) > 5:  # e.g. 766 -> 30; a narrow range reads better linear
        from matplotlib.ticker import ScalarFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
    elif log_scale:
        ylabel = ylabel.replace(" (log scale)", "")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend(loc="best", fontsize=8)
    return fig
