"""The hooks a wakelab plugin may implement.

Every hook takes one small context object so a hook's signature never has to change when the engine learns to pass
more. The contexts' fields are documented once, on the dataclasses in ``wakelab.hooks.context``; these docstrings say
when each hook runs and what it may do. A plugin implements a hook with ``@wakelab.hookimpl`` on a function of the same
name, or on a method of the same name of its module's ``Plugin`` class, made new for every run
(:func:`wakelab.hooks.registry.instance_of`). docs/hooks.md is generated from both (``wakelab plugins
--contexts-markdown``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # the types are for type checkers and readers; importing them here would pull in torch
    from ..config import PluginConfig, RunConfig
    from .context import GradContext, InitContext, InputsContext, RunContext, SaveContext, StepState

hookspec = pluggy.HookspecMarker("wakelab")


@hookspec(firstresult=True)
def init_embeddings(ctx: InitContext) -> dict[str, Any] | None:
    """Fill the new tokens' embedding rows, once, after the vocabulary is expanded and before training.

    ``ctx`` is an ``InitContext``. Answer only when ``ctx.method`` is your name: write the rows
    ``ctx.weight[ctx.new_ids]`` in place and return a dict of what you did (radius, scale, fall-backs...), which is
    logged as run params. Return ``None`` to let another plugin answer. Stops at the first non-None result; base
    rows must not be touched. Runs in every process (each fills its own copy of the rows, from the same seed).
    """


@hookspec
def mask_grads(ctx: GradContext) -> None:
    """Change gradients after backward and before gradient clipping and the optimizer step.

    ``ctx`` is a ``GradContext``. Edit gradients in place; the clipping, the logged grad norm and the optimizer
    then see the edited gradients. Runs in every process (each holds its own gradients).
    """


@hookspec
def on_step_end(state: StepState) -> None:
    """Observe the run after each optimizer step (and the learning-rate scheduler) has happened.

    ``state`` is a ``StepState``. Read only: do not modify the model or the optimizer here. Runs in every process;
    write files only where ``state.is_main_process``.
    """


@hookspec
def on_save(ctx: SaveContext) -> None:
    """React to a checkpoint that is complete on disk.

    ``ctx`` is a ``SaveContext``. Copy or read the checkpoint; never modify it. A failure here is a warning on stderr;
    training, and the other plugins' ``on_save``, go on. A stop signal's checkpoint comes here too (a second signal can
    interrupt this hook: the run then ends KILLED at once). Runs in the main process only (one checkpoint, one set of
    copies).
    """


@hookspec
def on_run_start(run: RunContext) -> None:
    """Prepare for a run, after the model, vocabulary and trainable rows are set up, before the first step.

    ``run`` is a ``RunContext``: keep it to read the run (and log to MLflow) from later hooks. Runs in every
    process; a plugin that writes files does so only where ``run.is_main_process``.
    """


@hookspec
def on_run_end(run: RunContext, status: str) -> None:
    """Finish up after training ended, normally (``status == "FINISHED"``) or not (``"FAILED"``; ``"KILLED"``
    after Ctrl-C or a stop signal: further signals are ignored while this runs).

    Called with the same ``RunContext`` as ``on_run_start`` before the MLflow run is closed: flush files and log
    the artifacts you own. Runs for failed runs too, so keep it safe to call after a partial run.
    """


@hookspec
def config_section() -> tuple[str, type[PluginConfig]] | None:
    """Declare this plugin's own config section: return ``(name, Model)``, ``Model`` a ``wakelab.PluginConfig``.

    Asked when a run's config is resolved, before anything is written. The section is then set like a core one
    (``--set name.key=value``, a ``name:`` mapping in a preset or ``--config`` file), validated by ``Model`` with the
    same one-line errors, listed by ``wakelab config-keys`` and logged as params; the plugin reads it back as
    ``run.config.<name>`` (a ``Model`` instance). Names must be unique among the active plugins and differ from
    wakelab's own sections. Return ``None`` for no section.
    """


@hookspec
def check_config(config: RunConfig) -> None:
    """Refuse a resolved config this plugin cannot run with, before anything is written.

    ``config`` is the validated ``RunConfig`` (core sections plus the active plugins' own). Raise
    ``wakelab.ConfigError`` with one line naming the key and the fix (e.g. "sentry.target: ... needs a backup
    location"); return nothing otherwise. Called only for active plugins.
    """


@hookspec
def check_inputs(ctx: InputsContext) -> None:
    """Refuse a run whose loaded inputs this plugin cannot serve, before anything is written.

    ``ctx`` is an ``InputsContext``: the resolved config with what only loading tells (the base model's config,
    the expanded tokenizer, the training corpus as token ids), before the base weights are loaded and before the
    run's directory and MLflow run are made. Check here what ``check_config`` cannot see: a setting the model
    cannot serve (a layer it lacks, a length beyond its context), data a plugin needs and the corpus lacks. Raise
    ``wakelab.ConfigError`` (a setting) or ``wakelab.DataError`` (the data) with one line naming the key and the
    fix; return nothing otherwise. Called only for active plugins, once per run, in every process; ``wakelab
    sweep`` also calls it for every child before the first one starts.
    """
