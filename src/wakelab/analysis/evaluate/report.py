"""``wakelab evaluate``: did the model learn the Wake? What the trained model *does* with its new words.

For one run, against the base model (and any other runs, e.g. sweep children):

1. **Generation**: N samples per prompt (held-out passages' first words, or a prompts file) from every model, with
   the same seeds and settings (:mod:`wakelab.analysis.evaluate.sampling`); an MLflow table and ``samples.json`` with
   the coined words marked ``[[like so]]``.
2. **Stylometry** (:mod:`wakelab.analysis.evaluate.stylometry`): Burrows' Delta of each sample set to the training
corpus and
   to a reference text, the coined-word rate beside the corpus's own, the share of coined words used in a corpus
   context, distinct-1/2, repetition and mean word length; a verdict line.
3. **Perplexity by token class** on the held-out text, right after init and after training
   (:mod:`wakelab.analysis.evaluate.token_classes`).
4. **The cost on ordinary text**: reference text without coined words, base softmax against the grown one, and the
   probability mass the new rows take there.
5. **The meaning probe** with its norm-free AUC beside the substitution score (when the run has constituents).

Everything goes to a new MLflow run nested under the evaluated one (``evaluate-<name>``; a run may be evaluated
many times, with other seeds, and params never clash), under ``evaluate/``, and to ``<run_dir>/evaluate/``.
Inputs are all checked before anything is loaded or written (:func:`check_inputs`).
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import WakelabError
from .. import plots
from ..sink import AnalysisSink
from . import stylometry as sty
from .sampling import Sampling, sample
from .token_classes import class_split, reference_cost, score_positions

__all__ = ["EvaluateOptions", "EvaluateReport", "check_inputs", "evaluate_run", "default_prompts", "mark_coined"]

Warn = Callable[[str], None]
ROOT = "evaluate"
BASE = "base"


@dataclass
class EvaluateOptions:
    """The ``wakelab evaluate`` options."""

    against: tuple[str, ...] = (BASE,)
    prompts: str | None = None  # a file, one prompt a line; None: the first words of held-out passages
    reference: str | None = None  # a text file; None: the held-out text
    samples: int = 2
    max_new_tokens: int = 48
    seed: int = 0
    temperature: float = 0.8
    top_p: float = 0.95
    num_prompts: int = 6
    prompt_words: int = 8
    mfw: int = 100
    eval_max_blocks: int | None = None
    allow_different_base: bool = False
    probe: bool = True
    mlflow: bool = True
    attach_outer: bool = True  # log into MLFLOW_RUN_ID (``mlflow run``'s run) when it is set; a sweep says no
    out: str | None = None

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.max_new_tokens, self.seed)


@dataclass
class EvaluateReport:
    local_dir: Path
    run_id: str | None
    summary: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    metric_names: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.summary)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs, all checked before anything is loaded or written


@dataclass
class _Inputs:
    run_dir: Path
    run_id: str | None
    config: Any
    prompts: list[str] | None  # from --prompts
    reference_text: str | None  # from --reference
    heldout_path: str | None
    others: list[tuple[str, Path, Any]]  # (target, run_dir, config) of --against runs


def _read_utf8(path: str, what: str, option: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise WakelabError(f"{option} {path}: no such file; give the path of a UTF-8 text file ({what})")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise WakelabError(f"{option} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 ({what})") from None


def _run_config(target: str, option: str):
    import yaml

    from ...config import validate
    from ...run.state import resolve_run

    run_dir, run_id = resolve_run(target)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise WakelabError(f"{option}{target} is not a wakelab run (no config.yaml in {run_dir}); give a run's "
                           "output directory or its MLflow run id")  # fmt: skip
    return run_dir, run_id, validate(yaml.safe_load(config_file.read_text()), strict=False)


def _base_identity(config) -> tuple:
    m = config.model
    return (m.name_or_path, m.revision, json.dumps(m.architecture, sort_keys=True), m.tokenizer)


def check_inputs(target: str, opts: EvaluateOptions) -> _Inputs:
    """Every bad input as one WakelabError, before a model is loaded or a file written."""
    if opts.samples < 1:
        raise WakelabError(f"--samples {opts.samples}: draw at least 1 sample per prompt")
    if opts.max_new_tokens < 1:
        raise WakelabError(f"--max-new-tokens {opts.max_new_tokens}: generate at least 1 token")
    if opts.temperature < 0:
        raise WakelabError(f"--temperature {opts.temperature}: must be >= 0 (0 means greedy)")
    if not 0 < opts.top_p <= 1:
        raise WakelabError(f"--top-p {opts.top_p}: must be in (0, 1] (1 keeps every token)")
    if opts.mfw < 2:
        raise WakelabError(f"--mfw {opts.mfw}: Burrows' Delta needs at least 2 most frequent words")
    prompts = None
    if opts.prompts is not None:
        text = _read_utf8(opts.prompts, "one prompt a line", "--prompts")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise WakelabError(f"--prompts {opts.prompts} holds no prompt (it is empty); write one prompt a line")
    reference = None
    if opts.reference is not None:
        reference = _read_utf8(opts.reference, "the reference text", "--reference")
        if not sty.words(reference):
            raise WakelabError(f"--reference {opts.reference} holds no words; give a text to compare with")
    run_dir, run_id, config = _run_config(target, "")
    from ...data.corpus import resolve_data_paths

    heldout = resolve_data_paths(config)[2]
    if heldout is not None and not Path(heldout).is_file():
        raise WakelabError(f"the run's held-out text {heldout} (data.heldout) is missing; restore it or give "
                           "--prompts and --reference")  # fmt: skip
    has_heldout = heldout is not None or config.data.heldout_fraction > 0
    if not has_heldout and prompts is None:
        raise WakelabError(f"run {run_dir} has no held-out text (data.heldout unset, data.heldout_fraction 0) and no "
                           "--prompts was given: give --prompts FILE (one prompt a line)")  # fmt: skip
    others = []
    seen = set()
    for other in opts.against:
        if other in seen:
            raise WakelabError(f"--against {other} is given twice; name each model once")
        seen.add(other)
        if other == BASE:
            continue
        other_dir, _, other_config = _run_config(other, "--against ")
        if other_dir.resolve() == run_dir.resolve():
            raise WakelabError(f"--against {other} is the evaluated run itself; name another run or `base`")
        if _base_identity(other_config) != _base_identity(config) and not opts.allow_different_base:
            raise WakelabError(
                f"--against {other}: its base model ({other_config.model.name_or_path}) differs from the run's "
                f"({config.model.name_or_path}); compare runs of one base, or add --allow-different-base"
            )
        others.append((other, other_dir, other_config))
    return _Inputs(run_dir, run_id, config, prompts, reference, heldout, others)


# ----------------------------------------------------------------------------------------------------------------------
# Texts


def default_prompts(text: str, count: int, length: int) -> list[str]:
    """The first ``length`` words of ``count`` passages spread over ``text`` (paragraphs, else lines, else
    sentences)."""
    for pattern in (r"\n\s*\n", r"\n", r"(?<=[.!?])\s+"):
        passages = [p.strip() for p in re.split(pattern, text) if len(p.split()) >= 2]
        if len(passages) >= count:
            break
    if not passages:
        return []
    step = len(passages) / min(count, len(passages))
    picked = [passages[int(i * step)] for i in range(min(count, len(passages)))]
    return [" ".join(p.split()[:length]) for p in picked]


def mark_coined(text: str, coined: set[str]) -> tuple[str, list[str]]:
    """``text`` with each coined word shown ``[[word]]``, and the coined words found, in order."""
    found: list[str] = []

    def mark(match: re.Match) -> str:
        if match.group(0).lower() in coined:
            found.append(match.group(0).lower())
            return f"[[{match.group(0)}]]"
        return match.group(0)

    return sty.WORD.sub(mark, text), found


def without_coined(text: str, coined: set[str]) -> str:
    """The sentences of ``text`` that hold no coined word, line by line (ordinary text for the cost of the grown
    vocabulary)."""
    kept = []
    for line in text.splitlines():
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", line) if not any(w in coined for w in sty.words(s))]
        if sentences:
            kept.append(" ".join(sentences))
    return "\n".join(kept)


def _coined_words(tokenizer, num_base: int) -> set[str]:
    words = set()
    for token_id in range(num_base, len(tokenizer)):
        words.update(sty.words(tokenizer.decode([token_id])))
    return words


def _heldout(config, tokenizer, heldout_path: str | None):
    """(held-out text, held-out block dataset): the data.heldout file, else the held-out tail of the corpus."""
    from ...data.corpus import build_datasets, read_text, resolve_data_paths, text_form, token_cache_dir

    _, corpus, _ = resolve_data_paths(config)
    dataset = build_datasets(config.data, corpus, heldout_path, tokenizer, token_cache_dir(config.data),
                             text_form(config)).heldout  # fmt: skip
    if heldout_path is not None:
        return read_text(heldout_path, "heldout", text_form(config)), dataset
    if dataset is None:
        return None, None
    return tokenizer.decode(dataset.blocks.reshape(-1).tolist(), skip_special_tokens=True), dataset


def _label(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


# ----------------------------------------------------------------------------------------------------------------------
# The evaluation


def _generate(model, tokenizer, prompts: list[str], opts: EvaluateOptions, coined: set[str], label: str,
              num_base: int | None) -> tuple[list[dict], list[str]]:  # fmt: skip
    """Every prompt's samples as table rows (coined words marked) and the plain texts."""
    rows, texts = [], []
    settings = opts.sampling
    encoded = [(index, prompt, tokenizer(prompt, add_special_tokens=False)["input_ids"])
               for index, prompt in enumerate(prompts)]  # fmt: skip
    encoded = [(index, prompt, ids) for index, prompt, ids in encoded if ids]
    drawn = sample(model, [ids for _, _, ids in encoded], opts.samples, settings, tokenizer.eos_token_id,
                   streams=[index for index, _, _ in encoded])  # fmt: skip
    for (index, prompt, _), (outs, cut) in zip(encoded, drawn, strict=True):
        for number, new in enumerate(outs):
            text = tokenizer.decode(new, skip_special_tokens=True)
            marked, found = mark_coined(text, coined)
            new_tokens = sum(1 for t in new if num_base is not None and t >= num_base)
            rows.append({"model": label, "prompt_index": index, "sample": number, "prompt": prompt, "text": text,
                         "marked": marked, "coined_words": " ".join(found), "coined_count": len(found),
                         "new_tokens": new_tokens, "tokens": len(new), "prompt_cut": cut})  # fmt: skip
            texts.append(text)
    return rows, texts


def _free(*objects) -> None:
    del objects
    gc.collect()


def _ref_blocks(tokenizer, text: str, length: int, max_blocks: int) -> list[torch.Tensor]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: length * max_blocks + 1]
    return [torch.tensor(ids[s : s + length + 1]) for s in range(0, max(len(ids) - 1, 0), length)]


def evaluate_run(target: str, opts: EvaluateOptions | None = None, warn: Warn | None = None) -> EvaluateReport:
    """Evaluate one run (see the module docstring); returns the printed table and every figure."""
    from ...run.state import load_trained

    opts = opts or EvaluateOptions()
    warnings: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        if warn is not None:
            warn(message)

    inputs = check_inputs(target, opts)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    config = inputs.config
    results: dict[str, Any] = {"sampling": opts.sampling.params()}

    # --- right after init: the initial class split and probe ------------------------------------------------------
    tick = time.perf_counter()
    state = load_trained(target, initial=True)
    tokenizer, num_base = state.tokenizer, state.rows.num_base
    coined = _coined_words(tokenizer, num_base)
    heldout_text, heldout = (None, None)
    if inputs.heldout_path is not None or config.data.heldout_fraction > 0:
        heldout_text, heldout = _heldout(config, tokenizer, inputs.heldout_path)
    if heldout_text is None and inputs.prompts is None:
        raise WakelabError(f"run {inputs.run_dir} has no held-out text (its corpus is too short to hold some out) "
                           "and no --prompts was given: give --prompts FILE (one prompt a line)")  # fmt: skip
    max_blocks = opts.eval_max_blocks or config.train.eval_max_blocks
    blocks = [heldout.blocks[i] for i in range(min(len(heldout), max_blocks))] if heldout is not None else []
    split: dict[str, dict] = {}
    if blocks:
        split["before"] = class_split(score_positions(state.model, blocks, num_base), num_base)
    probe_obj, probe_before = None, None
    if opts.probe:
        from ..trajectory.watch import probe_setup

        probe_obj = probe_setup(config, tokenizer, num_base, seed=opts.seed, warn=note)
        if probe_obj is not None:
            from ..probe import probe as run_probe

            probe_before = run_probe(state.model, probe_obj)
    _free(state)
    state = None
    timings["initial_seconds"] = time.perf_counter() - tick

    # --- the trained model --------------------------------------------------------------------------------------------
    tick = time.perf_counter()
    state = load_trained(target)
    model = state.model
    results["state"] = "final rows" if state.step is None else f"checkpoint-{state.step}"
    if blocks:
        split["after"] = class_split(score_positions(model, blocks, num_base), num_base)
    results["class_split"] = split
    reference_text = inputs.reference_text if inputs.reference_text is not None else heldout_text
    reference_name = opts.reference or ("held-out text" if heldout_text is not None else None)
    cost = None
    if reference_text:
        ordinary = without_coined(reference_text, coined)
        ref_blocks = _ref_blocks(tokenizer, ordinary, config.data.seq_len, max_blocks)
        if ref_blocks:
            cost = reference_cost(score_positions(model, ref_blocks, num_base), num_base)
            cost["text"] = f"{reference_name}, sentences without coined words"
    results["reference_cost"] = cost
    probe_after = None
    if probe_obj is not None:
        from ..probe import probe as run_probe
        from ..probe import summarise as probe_summary

        probe_after = run_probe(model, probe_obj)
        results["probe"] = probe_summary(probe_before, probe_after)
        results["probe_words"] = {w: {"before": probe_before.get(w), "after": a} for w, a in probe_after.items()}
    timings["trained_eval_seconds"] = time.perf_counter() - tick

    prompts = inputs.prompts or default_prompts(heldout_text or "", opts.num_prompts, opts.prompt_words)
    if not prompts:
        raise WakelabError("the held-out text holds no passage to cut prompts from; give --prompts FILE")
    trained_label = "trained"
    tick = time.perf_counter()
    sample_rows, texts = _generate(model, tokenizer, prompts, opts, coined, trained_label, num_base)
    sets: dict[str, list[str]] = {trained_label: texts}
    timings["generate_trained_seconds"] = time.perf_counter() - tick
    _free(state, model)
    state = model = None

    for other in opts.against:
        tick = time.perf_counter()
        if other == BASE:
            from ... import model as model_mod

            source = model_mod.model_source(config.model, config.train.seed)
            base_tok = model_mod.load_tokenizer(model_mod.tokenizer_source(config.model) or source,
                                                config.model.revision)  # fmt: skip
            base_model = model_mod.load_model(config.model, source)
            rows, texts = _generate(base_model, base_tok, prompts, opts, coined, BASE, None)
            _free(base_model)
            base_model = None
            label = BASE
        else:
            other_state = load_trained(other)
            label = _label(Path(other).name if Path(other).exists() else other)
            while label in sets:
                label += "_"
            rows, texts = _generate(other_state.model, other_state.tokenizer, prompts, opts, coined, label,
                                    other_state.rows.num_base)  # fmt: skip
            _free(other_state)
            other_state = None
        sample_rows += rows
        sets[label] = texts
        timings[f"generate_{label}_seconds"] = time.perf_counter() - tick

    # --- stylometry -----------------------------------------------------------------------------------------------
    from ...data.corpus import read_text, resolve_data_paths, text_form

    corpus_text = read_text(resolve_data_paths(config)[1], "corpus", text_form(config))
    corpus_words = sty.words(corpus_text)
    reference_words = sty.words(reference_text or "")
    corpus_next = sty.next_words(corpus_words, coined)
    profiles = {name: sty.profile(texts, coined, corpus_next) for name, texts in sets.items()}
    corpus_profile = sty.profile([corpus_text], coined, corpus_next)
    word_lists = {"corpus": corpus_words, **({"reference": reference_words} if reference_words else {}),
                  **{name: [w for t in texts for w in sty.words(t)] for name, texts in sets.items()}}  # fmt: skip
    deltas, used = sty.burrows_delta(word_lists, opts.mfw)
    for name in sets:
        profiles[name]["delta_corpus"] = deltas.get((name, "corpus"))
        profiles[name]["delta_reference"] = deltas.get((name, "reference"))
    if reference_words:
        corpus_profile["delta_reference"] = deltas.get(("corpus", "reference"))
    closest = sty.closest(deltas, "corpus", list(sets))
    results.update(profiles=profiles, corpus=corpus_profile, mfw_words=len(used), mfw=used, closest=closest,
                   reference={"name": reference_name, "words": len(reference_words)},
                   prompts=prompts)  # fmt: skip
    if reference_words:
        results["reference"]["coined_per_1k"] = sty.coined_rate(reference_words, coined)
    timings["total_seconds"] = time.perf_counter() - started
    results["timings"] = timings
    verdict = _verdict(profiles, closest, deltas)
    results["verdict"] = verdict

    # --- out ------------------------------------------------------------------------------------------------------
    local = Path(opts.out) if opts.out else inputs.run_dir / "evaluate"
    client, dest, created = _destination(inputs, opts)
    sink = AnalysisSink(local, dest, client, root=ROOT)
    report = EvaluateReport(local, dest, warnings=warnings, results=results)
    status = "FAILED"
    try:
        _write(sink, report, inputs, opts, sample_rows, prompts)
        report.summary = _table(report, inputs, opts)
        sink.text("summary.txt", report.text)
        if client is not None and dest is not None:
            _log_params(client, dest, opts, prompts, reference_name, len(used))
            client.log_table(dest, data=_columns(sample_rows), artifact_file=f"{ROOT}/samples_table.json")
        sink.flush()
        status = "FINISHED"
    finally:
        if created and client is not None:
            client.set_terminated(dest, status)
    if client is not None and inputs.run_id is not None and dest is not None and dest != inputs.run_id:
        client.set_tag(inputs.run_id, "wakelab.evaluate.last_run", dest)
    report.metric_names = sink.metric_names
    return report


def _verdict(profiles: dict, closest: str | None, deltas: dict) -> str:
    if closest is None:
        return "no verdict: Burrows' Delta has no words to compare"
    others = ", ".join(f"{n} {deltas[(n, 'corpus')]:.3f}" for n in profiles if n != closest)
    return (f"closest to the corpus: {closest} (Delta {deltas[(closest, 'corpus')]:.3f}"
            + (f"; {others})" if others else ")"))  # fmt: skip


def _columns(rows: list[dict]) -> dict[str, list]:
    keys = list(rows[0]) if rows else ["model", "prompt", "text", "marked"]
    return {k: [r.get(k) for r in rows] for k in keys}


def _destination(inputs: _Inputs, opts: EvaluateOptions):
    """(client, run id, created): the run ``mlflow run`` made for this command, else a new run nested under the
    evaluated one (or a lone one when it is not in the tracking store); nothing with --no-mlflow."""
    if not opts.mlflow:
        return None, None, False
    from mlflow.exceptions import MlflowException

    from ...tracking.runs import ensure_experiment, mlflow_client

    client = mlflow_client()
    parent, experiment_id = None, None
    if inputs.run_id is not None:
        info = inputs.run_dir / "wakelab_run.json"
        uri = json.loads(info.read_text()).get("tracking_uri") if info.is_file() else None
        for candidate in [client] + ([mlflow_client(uri)] if uri else []):
            try:
                experiment_id = candidate.get_run(inputs.run_id).info.experiment_id
                client, parent = candidate, inputs.run_id
                break
            except MlflowException:
                continue
    tags = {"wakelab.evaluate.of": str(inputs.run_dir), "wakelab.analysis.kind": "evaluate"}
    if parent:
        tags["wakelab.evaluate.of_run"] = parent
    outer = os.environ.get("MLFLOW_RUN_ID") if opts.attach_outer else None
    if outer and outer != parent:
        for key, value in tags.items():
            client.set_tag(outer, key, value)
        return client, outer, False
    if experiment_id is None:
        experiment_id = ensure_experiment(inputs.config.tracking.experiment or "wakelab", client)
    tags["mlflow.runName"] = f"evaluate-{inputs.run_dir.resolve().name}"
    if parent:
        tags["mlflow.parentRunId"] = parent
    return client, client.create_run(experiment_id, tags=tags).info.run_id, True


def _log_params(client, run_id: str, opts: EvaluateOptions, prompts: list[str], reference: str | None,
                words: int) -> None:  # fmt: skip
    from mlflow.entities import Param

    params = {**{f"sampling.{k}": v for k, v in opts.sampling.params().items()}, "samples": opts.samples,
              "prompts": opts.prompts or f"held-out passages ({opts.num_prompts} x {opts.prompt_words} words)",
              "prompt_count": len(prompts), "reference": reference or "none", "against": ",".join(opts.against),
              "mfw": opts.mfw, "mfw_words_used": words,
              "sampler": "inverse-CDF, one seeded uniform stream per prompt"}  # fmt: skip
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])


def _write(sink: AnalysisSink, report: EvaluateReport, inputs: _Inputs, opts: EvaluateOptions, sample_rows: list[dict],
           prompts: list[str]) -> None:  # fmt: skip
    r = report.results
    sink.json("samples", {"sampling": r["sampling"], "samples_per_prompt": opts.samples, "prompts": prompts,
                          "marking": "coined words are shown [[word]] in `marked`",
                          "samples": sample_rows})  # fmt: skip
    rows = [{"set": "corpus", **r["corpus"]}]
    rows += [{"set": name, **p} for name, p in r["profiles"].items()]
    sink.table("stylometry", rows)
    sink.json("delta", {"mfw_asked": opts.mfw, "mfw_words_used": r["mfw_words"], "words": r["mfw"],
                        "closest_to_corpus": r["closest"], "verdict": r["verdict"]})  # fmt: skip
    metrics: dict[str, Any] = {"mfw_words": r["mfw_words"], "corpus/coined_per_1k": r["corpus"]["coined_per_1k"]}
    for name, p in r["profiles"].items():
        for key in ("coined_per_1k", "corpus_context_share", "distinct_1", "distinct_2", "repetition_4",
                    "mean_word_length", "delta_corpus", "delta_reference", "words"):  # fmt: skip
            metrics[f"{_label(name)}/{key}"] = p.get(key)
    split_rows = []
    for when, classes in r["class_split"].items():
        for cls, v in classes.items():
            split_rows.append({"when": when, "class": cls, **v})
            metrics[f"perplexity/{cls}_{when}"] = v["perplexity"]
            metrics[f"loss/{cls}_{when}"] = v["loss"]
    sink.table("perplexity_by_class", split_rows)
    if r["reference_cost"]:
        sink.table("reference_cost", [r["reference_cost"]])
        metrics.update({f"reference/{k}": v for k, v in r["reference_cost"].items() if k != "text"})
    if r.get("probe"):
        sink.table("probe", [{"word": w, **{f"{k}_{when}": (v or {}).get(k) for when, v in s.items()
                                            for k in ("kl", "substitution", "auc", "rank")}}
                             for w, s in r["probe_words"].items()])  # fmt: skip
        metrics.update({f"probe/{k.removeprefix('probe_')}": v for k, v in r["probe"].items()})
    metrics.update({f"seconds/{k.removesuffix('_seconds')}": v for k, v in r["timings"].items()})
    sink.metrics(metrics)
    sink.tags({"wakelab.evaluate.verdict": r["verdict"]})
    sink.figure("coined_rate_and_delta", figure(r["profiles"], r["corpus"]["coined_per_1k"]))


def figure(profiles: dict[str, dict], corpus_rate: float):
    """Two panels: coined words per 1,000 (the corpus's rate as a line) and Delta to the corpus, per model."""
    fig, (left, right) = plots.new_figure(ncols=2, width=5.5)
    names = list(profiles)
    bars = left.bar(names, [profiles[n]["coined_per_1k"] for n in names], color="tab:orange")
    left.bar_label(bars, fmt="%.1f")  # a model that writes none shows "0.0", not an empty slot
    left.margins(y=0.12)
    left.axhline(corpus_rate, color="gray", linestyle="--", label=f"corpus ({corpus_rate:.1f})")
    left.set_title("Coined words per 1,000 words")
    left.set_xlabel("model")
    left.set_ylabel("coined words per 1,000 words")
    left.legend(loc="best")
    deltas = [profiles[n].get("delta_corpus") for n in names]
    bars = right.bar(names, [d if d is not None and math.isfinite(d) else 0.0 for d in deltas], color="tab:blue")
    right.bar_label(bars, fmt="%.3f")  # the gap between models is often in the second decimal
    right.margins(y=0.12)
    right.set_title("Burrows' Delta to the corpus (lower is closer)")
    right.set_xlabel("model")
    right.set_ylabel("Delta (mean |z| difference)")
    return fig


# ----------------------------------------------------------------------------------------------------------------------
# The printed table


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1000 else f"{value:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def _table(report: EvaluateReport, inputs: _Inputs, opts: EvaluateOptions) -> list[str]:
    r = report.results
    s = r["sampling"]
    lines = [f"evaluate {inputs.run_dir}, {r['state']} ({inputs.run_id or 'not tracked'}): {len(r['prompts'])} "
             f"prompts x {opts.samples} samples, {s['max_new_tokens']} new tokens, seed {s['seed']}, temperature "
             f"{s['temperature']}, top-p {s['top_p']}",
             f"stylometry: Burrows' Delta over the {r['mfw_words']} most frequent words (of {opts.mfw} asked); "
             f"reference: {r['reference']['name']} ({r['reference']['words']} words)"]  # fmt: skip
    header = ("set", "words", "coined/1k", "in ctx", "dist-1", "dist-2", "rep-4", "word len", "Delta corp",
              "Delta ref")  # fmt: skip
    widths = (12, 7, 9, 6, 6, 6, 6, 8, 10, 9)
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines.append("  " + fmt.format(*header))
    rows = [("corpus", r["corpus"])] + list(r["profiles"].items())
    for name, p in rows:
        lines.append("  " + fmt.format(
            name[:12], p["words"], _f(p["coined_per_1k"], 2), _f(p["corpus_context_share"], 2), _f(p["distinct_1"]),
            _f(p["distinct_2"]), _f(p["repetition_4"]), _f(p["mean_word_length"], 2),
            "0" if name == "corpus" else _f(p.get("delta_corpus")), _f(p.get("delta_reference"))))  # fmt: skip
    lines.append(f"verdict: {r['verdict']}")
    split = r["class_split"]
    if split:
        lines.append("perplexity by target class (held-out text; loss in nats, perplexity in brackets):")
        heads = (("class", 6), ("positions", 9), ("right after init", 22), ("trained", 22))
        lines.append("  " + "  ".join(f"{h:>{w}}" for h, w in heads))
        for cls in ("new", "base", "all"):
            cells = []
            for when in ("before", "after"):
                v = split.get(when, {}).get(cls)
                cells.append("-" if not v or v["loss"] is None else f"{v['loss']:.3f} ({v['perplexity']:.4g})")
            positions = (split.get("after") or split.get("before"))[cls]["positions"]
            lines.append("  " + f"{cls:>6}  {positions:>9}  {cells[0]:>22}  {cells[1]:>22}")
    else:
        lines.append("perplexity by target class: no held-out blocks")
    cost = r["reference_cost"]
    if cost:
        lines.append(f"cost on ordinary text ({cost['text']}, {cost['positions']} positions): perplexity base "
                     f"{_f(cost['base_perplexity'], 4)} -> trained {_f(cost['trained_perplexity'], 4)} "
                     f"(+{cost['loss_increase']:.2e} nats); new tokens take {cost['new_mass_mean']:.2e} of the "
                     f"probability on average (max {cost['new_mass_max']:.2e})")  # fmt: skip
    else:
        lines.append("cost on ordinary text: no reference lines without coined words")
    probe = r.get("probe")
    if probe:
        lines.append(f"meaning probe ({int(probe.get('probe_words', 0))} words), right after init -> trained: "
                     f"KL {_f(probe.get('probe_kl_before'))} -> {_f(probe.get('probe_kl_after'))} nats; "
                     f"substitution {_f(probe.get('probe_substitution_before'))} -> "
                     f"{_f(probe.get('probe_substitution_after'))} nats (grows with the norm); "
                     f"AUC {_f(probe.get('probe_auc_before'))} -> {_f(probe.get('probe_auc_after'))} (norm-free, 0.5 "
                     f"= chance); median rank {_f(probe.get('probe_rank_before'))} -> "
                     f"{_f(probe.get('probe_rank_after'))}")  # fmt: skip
    t = r["timings"]
    lines.append("seconds: " + ", ".join(f"{k.removesuffix('_seconds')} {v:.1f}" for k, v in t.items()))
    for message in report.warnings:
        lines.append(f"warning: {message}")
    where = f"MLflow run {report.run_id} under {ROOT}/" if report.run_id else "no MLflow run (--no-mlflow)"
    lines.append(f"logged to {where}; files in {report.local_dir}")
    return lines
