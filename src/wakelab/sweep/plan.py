"""Planning a sweep: every child's config resolved and checked before anything runs."""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import logs
from ..config import RunConfig, parse_value, plugin_section, resolve_key, set_in, validate
from ..errors import ConfigError, DataError, WakelabError
from ..hooks import registry

Log = Callable[[str], None]

#: Keys a sweep cannot vary, and why.
FIXED_KEYS = {
    "preset": "a preset is a whole config; sweep over a key, or run one sweep per preset",
    "output_dir": "each child gets <output_dir>/<key>=<value>; set the sweep's folder with --output-dir",
    "tracking.experiment": "the children live in the parent's experiment; set it with --experiment",
    "tracking.run_name": "the children are named <key>=<value>; name the parent with --run-name",
}


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


def check_children_inputs(children: list[Child], cwd: Path | None) -> None:
    """The active plugins' own checks of each child's loaded inputs (``check_inputs``: a distill target layer the
    model lacks, a corpus that never uses the words), all before the first child starts."""
    from ..run.build import check_planned_inputs

    for child in children:
        try:
            check_planned_inputs(child.config, cwd)
        except WakelabError as exc:
            raise type(exc)(f"--over {child.label}: {exc}") from None


def _implements_init(source) -> bool:
    try:
        module = source.load()
    except WakelabError:
        return False
    from ..hooks.registry import instance_of

    return callable(getattr(instance_of(module), "init_embeddings", None))


def check_output_dirs(children: list[Child], overwrite: bool) -> None:
    from ..run.engine import RUN_FILE

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
        from ..data.demo import ensure_demo_texts

        return ensure_demo_texts().constituents
    path = Path(name)
    if not path.is_file():
        raise DataError(f"constituents file not found: {path} (--constituents / init.constituents)")
    return path


def _constituents_value(given: str) -> str:
    """``--constituents`` as a child's ``init.constituents``: ``demo``, or the file's absolute path (a child's run is
    read again later, by ``wakelab analyze`` or a resumed sweep, from wherever that is started)."""
    return given if given == "demo" else str(Path(given).expanduser().resolve())


def carry_constituents(base: RunConfig, given: str | None) -> RunConfig:
    """The base config with ``--constituents`` as its ``init.constituents``, so every child's own run reads the file
    the hit rates read: its trajectory page draws the meaning words and its probe runs on them.

    A config that names its own file (``--set init.constituents=...``, ``--config``, or the swept key) keeps it: the
    config is the record of what the child ran with; :func:`_note_own_constituents` says so in one line. The base
    holds the file, so ``sweep.json`` records it and ``--resume`` plans the same children."""
    if given is None or base.init.constituents is not None:
        return base
    tree = base.model_dump(mode="json")
    tree["init"]["constituents"] = _constituents_value(given)
    return validate(tree)


def _note_own_constituents(children: list[Child], given: str | None, log: Log) -> None:
    if given is None:
        return
    value = _constituents_value(given)
    own = [c for c in children if c.config.init.constituents not in (None, value)]
    own = [c for c in own if _constituents_value(c.config.init.constituents) != value]  # the same file, spelt apart
    if own:
        first = f"{own[0].label}: {own[0].config.init.constituents}"
        log(
            f"note: --constituents {given} gives the hit rates; {len(own)} of {len(children)} children keep their own "
            f"init.constituents for their trajectory pages and probes ({first})"
        )


def load_constituents(path: Path, children: list[Child], log: Log) -> tuple[dict[str, list[str]], list[str]]:
    """The constituents of lexicon words, and the words of the file that no child's lexicon holds (reported)."""
    from ..data.corpus import resolve_lexicon
    from ..data.demo_texts import read_constituents
    from ..vocab import read_lexicon

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
    constituents_to_children: bool = True,
) -> SweepPlan:
    """Resolve and check the whole sweep; raises a one-line ``WakelabError`` before anything runs.

    Several ``over`` specs cross their values: one child per combination. ``constituents`` becomes the children's
    ``init.constituents`` (:func:`carry_constituents`) unless ``constituents_to_children`` is False: a resumed sweep's
    base, read from ``sweep.json``, holds already what its first plan carried."""
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
    base = carry_constituents(base, constituents) if constituents_to_children else base
    root = base.resolved_output_dir
    if len(axes) == 1:
        key, canonical, texts = axes[0]
        children = child_configs(base, key, canonical, texts, root)
    else:
        key, canonical = "+".join(a[0] for a in axes), ",".join(a[1] for a in axes)
        children = crossed_configs(base, axes, root)
    check_init_methods(children, cwd)
    check_output_dirs(children, overwrite)
    check_children_inputs(children, cwd)
    plan = SweepPlan(
        key, canonical, base, root, children, top_k=top_k, over=tuple([over] if isinstance(over, str) else over)
    )
    plan.constituents_path = resolve_constituents(base, constituents)
    if plan.constituents_path is not None:
        plan.constituents, plan.not_in_lexicon = load_constituents(plan.constituents_path, children, log)
    _note_own_constituents(children, constituents if constituents_to_children else None, log)
    return plan
