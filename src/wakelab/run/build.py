"""The first half of a run, shared by ``engine.run`` and everything that rebuilds a run's starting point.

``prepare`` finds everything that can be wrong with a config's inputs (plugins, base model, tokenizer, lexicon, an
earlier phase's matrix) before anything is written, and ``check_inputs`` lets the active plugins refuse them (the
engine calls it once the corpus is read); ``build_model`` then loads the base, grows its vocabulary, fills the new
rows through the ``init_embeddings`` hook and restores an earlier phase. ``engine.run`` and ``expand_for_config`` (a
finished run's starting state, for analysis and sweeps) call the same ``prepare`` and ``build_model``, so they cannot
drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pluggy
import torch

from .. import model as model_mod
from ..config import RunConfig
from ..data.corpus import resolve_lexicon
from ..errors import ConfigError, PluginError
from ..hooks import registry
from ..hooks.context import InitContext, InputsContext
from ..logs import log
from ..rows import BaseRows
from ..vocab import VocabReport, expand_from_lexicon, word_token_id
from .merge import embedding_checksum


@dataclass
class Prepared:
    """A config's inputs, loaded and checked: what ``build_model`` needs, nothing yet written anywhere."""

    pm: pluggy.PluginManager
    source: str
    model_config: Any
    tokenizer: Any
    num_base: int
    report: VocabReport | None = None
    new_words: list[str] = field(default_factory=list)
    phase: tuple[torch.Tensor, dict[str, Any]] | None = None
    base_checksum: str | None = None  # sha256 of the loaded base rows: an export refuses a base that changed since
    #: The embedding (and an untied head's) weight as loaded, before the resize: the base rows the ``tokens`` split
    #: keeps frozen without a copy (see ``rows.setup_trainable_rows``); None when the base rows were overwritten.
    base_rows: BaseRows | None = None

    @property
    def hidden_size(self) -> int | None:
        return getattr(self.model_config, "hidden_size", None) or getattr(self.model_config, "n_embd", None)


def prepare(config: RunConfig, cwd: Path | None = None, *, check_seq_len: bool = True) -> Prepared:
    """Plugins, base model config, tokenizer grown by the lexicon, and an earlier phase's matrix, all checked."""
    pm = registry.build_manager(config.active_plugins, cwd, optional=[config.init.method])
    source = model_mod.model_source(config.model, config.train.seed)
    model_config = model_mod.load_model_config(source, config.model.revision)
    if check_seq_len:
        model_mod.check_seq_len(model_config, config.data.seq_len)
    tokenizer = model_mod.load_tokenizer(model_mod.tokenizer_source(config.model) or source, config.model.revision)
    prepared = Prepared(pm, source, model_config, tokenizer, len(tokenizer))
    lexicon_path = resolve_lexicon(config)
    if lexicon_path is not None:
        prepared.report, prepared.new_words = expand_from_lexicon(tokenizer, config.vocab, lexicon_path)
    if config.init.from_embeddings:
        shape = (len(tokenizer), prepared.hidden_size)
        prepared.phase = load_phase_matrix(config.init.from_embeddings, shape, tokenizer)
    return prepared


def check_inputs(config: RunConfig, prepared: Prepared, corpus_ids: Any) -> None:
    """Let the active plugins refuse the loaded inputs (the ``check_inputs`` hook): the base model's config, the
    expanded tokenizer and the training ids (``corpus_ids``, or None) are known, nothing is written yet."""
    ctx = InputsContext(
        config=config,
        model_config=prepared.model_config,
        tokenizer=prepared.tokenizer,
        num_base=prepared.num_base,
        new_ids=torch.arange(prepared.num_base, prepared.num_base + len(prepared.new_words)),
        new_words=list(prepared.new_words),
        corpus_ids=corpus_ids,
    )
    prepared.pm.hook.check_inputs(ctx=ctx)


def check_planned_inputs(config: RunConfig, cwd: Path | None = None) -> None:
    """The ``check_inputs`` hook for a config that has not started: a sweep asks it of every child before the first
    one runs, so the third child's bad target layer stops the sweep at once, not after two children's training.
    Loads the tokenizer and the corpus ids only when an active plugin implements the hook."""
    pm = registry.build_manager(config.active_plugins, cwd, optional=[config.init.method])
    if not pm.hook.check_inputs.get_hookimpls():
        return
    from ..data.span import training_ids

    prepared = prepare(config, cwd)
    check_inputs(config, prepared, training_ids(config, prepared.tokenizer))


def build_model(
    config: RunConfig,
    prepared: Prepared,
    *,
    log_params: Callable[[dict[str, Any]], None] = lambda params: None,
    set_tags: Callable[[dict[str, str]], None] = lambda tags: None,
    corpus_ids: Callable[[], Any] | None = None,
    log_metrics: Callable[[dict[str, float], int], None] = lambda metrics, step: None,
    progress: bool = False,
    initial_rows: Path | None = None,
) -> torch.nn.Module:
    """The base model with the grown vocabulary, its new rows filled by the init plugin, an earlier phase restored.

    ``corpus_ids`` (the training text's token ids, read on first call), ``log_metrics`` and ``progress`` reach the
    init plugin through its ``InitContext``; an init that learns from the corpus needs the first. ``initial_rows``
    (a run's ``initial_rows.safetensors``) puts back the rows that run's init made instead of running it again."""
    what = (
        f"a {config.model.architecture['model_type']} built from model.architecture"
        if config.model.architecture
        else f"base model {config.model.name_or_path}"
    )
    log(f"loading {what}" + (" in 4-bit nf4" if config.model.load_in_4bit else ""))
    model = model_mod.load_model(config.model, prepared.source)
    tokenizer, num_base = prepared.tokenizer, prepared.num_base
    prepared.base_checksum = embedding_checksum(model, num_base)
    weight = model.get_input_embeddings().weight
    log_params({"base_vocab_size": num_base, "hidden_size": weight.shape[1]})
    if prepared.report is not None or weight.shape[0] < len(tokenizer):
        prepared.base_rows = BaseRows.of(model, num_base)
        # The init plugin fills the embedding's new rows; an untied head's new rows are the ones transformers' resize
        # draws. Seeded here, a run and its rerun start from the same head.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init.seed)
            model_mod.expand_embeddings(model, len(tokenizer))
    if prepared.report is not None:
        log(prepared.report.summary())
    log_params({"added_tokens": len(prepared.new_words), "vocab_size": len(tokenizer)})

    weight = model.get_input_embeddings().weight
    if prepared.new_words and initial_rows is not None:
        load_initial_rows(model, initial_rows)
    elif prepared.new_words:
        new_ids = torch.arange(num_base, weight.shape[0])
        started = time.monotonic()
        report: dict[str, Any] = {}
        summary = init_new_rows(
            prepared.pm,
            config,
            weight,
            num_base,
            new_ids,
            prepared.new_words,
            tokenizer,
            model=model,
            corpus_ids=corpus_ids,
            log_metrics=log_metrics,
            progress=progress,
            report=report,
        )
        log_params({f"init.result.{k}": v for k, v in summary.items()})
        log_metrics({"init/seconds": time.monotonic() - started}, 0)
        if prepared.report is not None and report:
            prepared.report.init = report
    if prepared.phase is not None:
        matrix, restored = prepared.phase
        with torch.no_grad():
            weight.copy_(matrix.to(weight.dtype))
        if prepared.base_rows is not None and not prepared.base_rows.equal_to(weight):
            prepared.base_rows = None  # the restored matrix's base rows differ: the split copies them from it
        log_params({"init.restored_from": restored["restored_from"]})
        set_tags(
            {"wakelab.restored_from": restored["restored_from"]}
            | ({"wakelab.source_run": restored["run_id"]} if restored.get("run_id") else {})
        )
        log(f"restored embeddings from {restored['restored_from']}")
    return model


#: The new rows (and an untied head's) right after init, in a run's directory.
INITIAL_ROWS = "initial_rows.safetensors"


def save_initial_rows(model, num_base: int, path: Path) -> None:
    """The new rows as the init left them: small, and an init like ``distill`` costs minutes to run again."""
    from safetensors.torch import save_file

    from .merge import head_rows

    weight = model.get_input_embeddings().weight
    ids = torch.arange(num_base, weight.shape[0])
    tensors = {"token_ids": ids, "rows": weight.detach()[num_base:].float().cpu().contiguous()}
    head = head_rows(model, ids)
    if head is not None:
        tensors["head_rows"] = head.float()
    save_file(tensors, str(path))


def load_initial_rows(model, path: Path) -> None:
    from safetensors.torch import load_file

    from .merge import load_head_rows

    saved = load_file(str(path))
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[saved["token_ids"]] = saved["rows"].to(weight.device, weight.dtype)
    if "head_rows" in saved:
        load_head_rows(model, saved["token_ids"], saved["head_rows"])
    log(f"new rows as init left them, from {path}")


class Expanded(NamedTuple):
    """A run's starting state: the model with the grown vocabulary, its tokenizer, the base size, and the base rows
    as loaded (for ``rows.setup_trainable_rows``, so the ``tokens`` split does not copy them)."""

    model: torch.nn.Module
    tokenizer: Any
    num_base: int
    base_rows: BaseRows | None


def expand_for_config(config: RunConfig, cwd: Path | None = None, initial_rows: Path | None = None) -> Expanded:
    """The base model with the run's vocabulary expansion and init applied: the state a run starts from (the rows
    from ``initial_rows`` when given, else the init run again)."""
    prepared = prepare(config, cwd, check_seq_len=False)
    if initial_rows is not None:
        model = build_model(config, prepared, initial_rows=initial_rows)
        return Expanded(model, prepared.tokenizer, prepared.num_base, prepared.base_rows)

    def corpus_ids():  # an init that learns from the corpus reads it as the run did (only then is it read)
        from ..data.span import training_ids

        return training_ids(config, prepared.tokenizer)

    model = build_model(config, prepared, corpus_ids=corpus_ids)
    return Expanded(model, prepared.tokenizer, prepared.num_base, prepared.base_rows)


def init_new_rows(pm, config, weight, num_base, new_ids, new_words, tokenizer, **more) -> dict[str, Any]:
    """Ask the ``init_embeddings`` hook to fill the new rows; nobody answering ``init.method`` is an error.

    ``more`` are the InitContext's optional fields (model, corpus_ids, log_metrics, progress, report)."""
    generator = torch.Generator().manual_seed(config.init.seed)
    ctx = InitContext(
        method=config.init.method,
        weight=weight.data,
        num_base=num_base,
        new_ids=new_ids,
        new_words=new_words,
        tokenizer=tokenizer,
        options=config.init.model_dump(),
        generator=generator,
        log=log,
        config=config,
        **more,
    )
    with torch.no_grad():
        summary = pm.hook.init_embeddings(ctx=ctx)
    if summary is None:
        known = [row["name"] for row in registry.describe() if "init_embeddings" in row["hooks"]]
        raise PluginError(
            f"no plugin answered init.method={config.init.method}; init plugins found: "
            f"{', '.join(known) or 'none'} (or activate your own with --plugin NAME|PATH)"
        )
    return dict(summary)


def load_phase_matrix(path: str, shape: tuple[int, int], tokenizer) -> tuple[torch.Tensor, dict[str, Any]]:
    """An earlier phase's embedding matrix, checked against this run's expanded vocabulary before anything starts."""
    from ..data.phase import load_embedding_matrix

    matrix, token_ids, source_meta = load_embedding_matrix(path)
    if tuple(matrix.shape) != tuple(shape):
        raise ConfigError(
            f"init.from_embeddings {path}: matrix shape {tuple(matrix.shape)} does not fit the expanded vocabulary "
            f"{tuple(shape)}; it comes from another model or lexicon"
        )
    if token_ids is not None:
        vocab = tokenizer.get_vocab()
        for token, index in token_ids.items():
            if word_token_id(vocab, token) != index:
                raise ConfigError(
                    f"init.from_embeddings {path}: token '{token}' has id {index} there but "
                    f"{vocab.get(token)} in this tokenizer; it was saved for another lexicon order"
                )
    return matrix, {"restored_from": str(path), **source_meta}
