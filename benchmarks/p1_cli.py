"""Every command a user runs, through the CLI, at P1's proportions: peak RSS and wall time of each, as a subprocess.

P1 adds 44,195 new rows to Llama-3.2-1B's 128,256. Here the base is a Llama built from ``model.architecture`` with
Llama-3.2-1B's widths (hidden 2048, MLP 8192, 32 heads / 8 KV heads, head_dim 64, tied embeddings), random weights,
``--layers`` deep (2 by default; 16 is Llama-3.2-1B's depth), and the offline byte-level BPE trained to 128,256
tokens (``model.tokenizer=offline-bpe``); the lexicon is 44,195 coined words and the corpus the demo text with a
coined word in every sentence. Nothing is downloaded. Everything else is the default preset's (``demo.yaml``:
``trainable=tokens``, fp32, the ``trajectory`` plugin on), with ``data.seq_len=512``, batch 1, ``--steps`` steps.

Rows, each one ``wakelab`` process (``wait4``'s ``ru_maxrss``: the largest single process, a sweep's children
included):

- ``run, every plugin off``: ``--set plugins=[]``, the reference peak;
- ``run, default preset + --plugin trajectory``: frames, the HTML page, the per-token table with every new word's
  nearest base tokens at start and end (a chunked top-k: no new x base matrix);
- ``run, p1_evolved's plugins``: ``recorder`` (``embeddings`` of the ``new`` rows every step) and ``sentry``
  (mirroring a checkpoint), as the p1_evolved preset configures them, at every step instead of every 200;
- ``analyze`` (norms, isotropy, neighbours, held-out perplexity) and ``analyze --recording`` (dynamics, the
  trajectory and per-token table from the recording);
- ``export --format hf`` and ``--format peft``; ``generate``;
- ``sweep`` of two children (``init=spherical,mean``, plugins off) with its comparison, whose neighbour hit rates
  search the base rows for 1,000 constituents words.

Targets: every command's peak <= 1.25x the plugins-off run's; that run's peak <= 1.15x the floor = weights + new
rows + their gradients + Adam's two moments + one loss chunk (``train.loss_chunk_tokens`` x vocabulary float32
logits), printed beside it. The floor leaves out what any Python process with torch, transformers and MLflow
imported holds (about 0.5 GiB): that import baseline is measured in the same run and the ratio printed both with it
and without it.

``--layers 16`` (Llama-3.2-1B's depth) runs the training rows for one optimizer step (``--steps 1``), in bf16 and in
4-bit nf4 (bf16 compute), plugins off and with the default preset's trajectory. ``--wide`` re-measures the issue's
first figure instead: 50,257 base rows (the offline BPE's GPT-2 size), 44,195 new, d=256, 2 layers, seq 512 x batch
4, 3 steps, the default preset with trajectory on and with ``--set trajectory.enabled=false``; target: the
trajectory run <= 0.6 x 3.26 GiB.

The random-weights model and the 128,256-token BPE are built once under ``--cache`` (``WAKELAB_CACHE``): the first
run spends minutes on them (not counted in any row). Run it under the shared lock on a shared machine:

  flock /tmp/wakelab-heavy.lock python benchmarks/p1_cli.py [--layers 2] [--steps 3] [--only run-off,run-traj]
  flock /tmp/wakelab-heavy.lock python benchmarks/p1_cli.py --layers 16
  flock /tmp/wakelab-heavy.lock python benchmarks/p1_cli.py --wide
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from p1_shape import NUM_BASE, NUM_NEW, measure, wide_inputs

GiB = 1024**3
MiB = 1024**2
TARGET_COMMAND = 1.25
TARGET_FLOOR = 1.15
TARGET_WIDE = 0.6 * 3.26  # GiB: the figure from before the chunked loss, times 0.6
LLAMA_1B = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "rope_theta": 500000.0,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}
PROMPT = "The river ran past the old house and"


def param_count(arch: dict, vocab: int) -> int:
    """Parameters of a tied Llama of ``arch``'s widths with ``vocab`` embedding rows."""
    d, inner, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    kv = arch["num_key_value_heads"] * arch["head_dim"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * inner + 2 * d
    return vocab * d + layers * per_layer + d


def floor_bytes(arch: dict, num_base: int, num_new: int, weight_bytes: float, chunk_tokens: int) -> dict[str, int]:
    """The floor's parts: base weights, new rows (fp32), their gradients, Adam's two moments, one loss chunk."""
    d = arch["hidden_size"]
    new = num_new * d * 4
    return {
        "weights": int(param_count(arch, num_base) * weight_bytes),
        "new rows": new,
        "their gradients": new,
        "Adam state": 2 * new,
        "one loss chunk": chunk_tokens * (num_base + num_new) * 4,
    }


class Bench:
    def __init__(self, args, folder: str):
        self.args = args
        self.folder = folder
        self.env = dict(
            os.environ,
            WAKELAB_CACHE=args.cache,
            MLFLOW_TRACKING_URI=f"sqlite:///{folder}/mlflow.db",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        self.rows: list[tuple[str, float, float, str]] = []  # label, peak MiB, wall s, note
        self.failed = False

    def wakelab(self, label: str, argv: list[str], note: str = "") -> tuple[float, str]:
        cmd = [sys.executable, "-m", "wakelab", *argv]
        rc, output, peak_kib, wall = measure(cmd, env=self.env, cwd=self.folder)
        peak = peak_kib / 1024
        if rc != 0:  # said, and the other rows go on: one failure must not cost the rest of a long benchmark
            sys.stderr.write(output[-4000:])
            note = f"FAILED: `wakelab {argv[0]}` exited {rc}; {note}"
            self.failed = True
        self.rows.append((label, peak, wall, note))
        print(f"{label:<52} peak RSS {peak:>8,.0f} MiB  {wall:>6.0f} s  {note}", flush=True)
        return peak, output


def sets(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


def p1_tokenizer(num_base: int) -> str:
    """The offline BPE trained toward ``num_base`` tokens (the standard library's text gives about 66,500) and padded
    with never-produced reserved tokens up to exactly ``num_base``, as Llama-3's vocabulary reserves some: a
    ``num_base``-token tokenizer, so the base has ``num_base`` rows. Built once under the cache."""
    from wakelab.data import bpe
    from wakelab.paths import cache_root

    trained = bpe.build_offline_bpe(num_base)
    folder = cache_root() / "tokenizers" / f"{trained.name}-padded-{num_base}"
    if (folder / "tokenizer.json").exists():
        return str(folder)
    spec = json.loads((trained / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    start = max(max(vocab.values()), *(t["id"] for t in spec["added_tokens"])) + 1
    for i in range(start, num_base):
        vocab[f"<|reserved_{i}|>"] = i
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.copytree(trained, tmp)
    (tmp / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    os.replace(tmp, folder)
    return str(folder)


def run_overrides(args, arch: dict, lexicon: str, corpus: str, *, num_base: int, seq: int, batch: int) -> dict:
    tokenizer = {"model.tokenizer": "offline-bpe", "model.tokenizer_vocab_size": num_base}
    if num_base == NUM_BASE:
        tokenizer = {"model.tokenizer": p1_tokenizer(num_base)}
    return {
        "model.architecture": json.dumps({**arch, "vocab_size": num_base}),
        **tokenizer,
        "vocab.lexicon": lexicon,
        "data.corpus": corpus,
        "data.seq_len": seq,
        "train.batch_size": batch,
        "train.max_steps": args.steps,
        "train.eval_max_blocks": args.eval_blocks,
    }


def prepare(args, folder: str, words_count: int) -> tuple[str, str, list[str], float]:
    """The lexicon and corpus, and the tokenizer and random-weights model built once (their time counts nowhere)."""
    started = time.monotonic()
    lexicon, corpus, words = wide_inputs(folder, words_count, corpus_bytes=args.corpus_bytes)
    print(f"inputs: {len(words):,} coined words, corpus {os.path.getsize(corpus):,} bytes ({folder})", flush=True)
    return lexicon, corpus, words, time.monotonic() - started


def print_table(bench: Bench, reference: float | None, floor: dict[str, int] | None, title: str) -> None:
    print(f"\n{title}\n")
    print("| command | peak RSS (MiB) | wall (s) | peak / plugins-off run | target | note |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for label, peak, wall, note in bench.rows:
        ratio = f"{peak / reference:.2f}" if reference else "-"
        verdict = ""
        if reference and label != "run, every plugin off":
            verdict = f"<= {TARGET_COMMAND} {'PASS' if peak / reference <= TARGET_COMMAND else 'FAIL'}"
        print(f"| {label} | {peak:,.0f} | {wall:.0f} | {ratio} | {verdict} | {note} |")
    if floor and reference:
        total = sum(floor.values())
        parts = ", ".join(f"{k} {v / MiB:,.0f}" for k, v in floor.items())
        ratio = reference * MiB / total
        print(
            f"\nfloor = {total / MiB:,.0f} MiB ({parts} MiB); plugins-off run peak / floor = {ratio:.2f} "
            f"(target <= {TARGET_FLOOR}) {'PASS' if ratio <= TARGET_FLOOR else 'FAIL'}"
        )
        baseline = import_baseline(bench.env)
        above = (reference - baseline) * MiB / total
        print(
            f"a process that only imports what `wakelab run` imports (torch, transformers, MLflow, wakelab) peaks at "
            f"{baseline:,.0f} MiB; (plugins-off run peak - that) / floor = {above:.2f} "
            f"(target <= {TARGET_FLOOR}) {'PASS' if above <= TARGET_FLOOR else 'FAIL'}"
        )


def import_baseline(env: dict[str, str]) -> float:
    """Peak RSS (MiB) of a process that imports the training path's libraries and does nothing else: what no
    configuration of a run can take away, so the floor's tensors are compared with what the run adds to it."""
    code = "import torch, transformers, mlflow, wakelab.run.engine, wakelab.run.trainer, wakelab.cli.main"
    rc, output, peak_kib, _ = measure([sys.executable, "-c", code], env=env)
    if rc != 0:
        raise SystemExit(f"the import baseline failed: {output[-2000:]}")
    return peak_kib / 1024


def materialize(bench: Bench, overrides: dict) -> str:
    """Build (and save) the random-weights model these overrides load, before any row, so no row's peak includes
    building it: stored in the run's dtype, so one folder per dtype."""
    started = time.monotonic()
    cmd = [sys.executable, __file__, "--materialize-worker", json.dumps(overrides)]
    rc, output, _, _ = measure(cmd, env=bench.env)
    if rc != 0:
        sys.stderr.write(output[-3000:])
        raise SystemExit("building the random-weights model failed")
    folder = output.strip().splitlines()[-1]
    print(f"model: {folder} ({time.monotonic() - started:.0f} s, counted in no row)")
    return folder


def p1(args) -> int:
    folder = args.folder or tempfile.mkdtemp(prefix="wakelab-p1cli-")
    os.makedirs(folder, exist_ok=True)
    bench = Bench(args, folder)
    saved = os.path.join(folder, "rows.json")
    if os.path.exists(saved):  # --folder again: the rows measured before (the reference among them) come first
        bench.rows = [tuple(row) for row in json.load(open(saved))]
    try:
        lexicon, corpus, words, _ = prepare(args, folder, NUM_NEW)
        arch = {**LLAMA_1B, "num_hidden_layers": args.layers}
        if args.hidden != LLAMA_1B["hidden_size"]:  # a smoke test of the script at a small width
            heads = args.hidden // 64
            arch.update(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_attention_heads=heads,
                        num_key_value_heads=max(1, heads // 4))  # fmt: skip
        base = run_overrides(args, arch, lexicon, corpus, num_base=NUM_BASE, seq=512, batch=1)
        only = set(args.only.split(",")) if args.only else None

        def wanted(name: str) -> bool:
            return only is None or name in only

        dtypes = args.dtypes.split(",") if args.dtypes else (["float32"] if args.layers <= 2 else ["bf16", "nf4"])
        reference = floor = None
        done = {row[0]: row[1] for row in bench.rows}
        if "run, every plugin off" in done:
            reference = done["run, every plugin off"]
            weight_bytes = {"float32": 4, "bf16": 2, "nf4": 2}[dtypes[0]]
            floor = floor_bytes(arch, NUM_BASE, NUM_NEW, weight_bytes, args.loss_chunk)
        if args.no_eval:
            base["train.eval_perplexity"] = "false"
        for dtype in dtypes:
            precision = {
                "float32": {"model.dtype": "float32"},
                "bf16": {"model.dtype": "bfloat16"},
                "nf4": {"model.load_in_4bit": "true", "model.compute_dtype": "bfloat16"},
            }[dtype]
            if dtype == "nf4":
                # 4-bit loads pretrained weights only: the bf16 random weights, saved, loaded from their folder as a
                # pretrained checkpoint is (P1 quantizes Llama-3.2-1B's bf16 checkpoint the same way).
                folder_bf16 = materialize(bench, {**base, "model.dtype": "bfloat16"})
                common = {k: v for k, v in base.items() if k != "model.architecture"}
                common.update(precision, **{"model.name_or_path": folder_bf16})
            else:
                common = {**base, **precision}
                materialize(bench, common)
            tag = "" if len(dtypes) == 1 else f" [{dtype}]"
            out_off, out_traj, out_rec = (os.path.join(folder, f"{n}-{dtype}") for n in ("off", "traj", "rec"))
            if wanted("run-off"):
                peak, _ = bench.wakelab(
                    f"run, every plugin off{tag}",
                    ["run", "--no-progress", *sets({**common, "output_dir": out_off}), "--set", "plugins=[]"]
                    + [arg for path in args.probe for arg in ("--plugin", path)],
                )
                if dtype == dtypes[0]:
                    reference = peak
                    weight_bytes = {"float32": 4, "bf16": 2, "nf4": 2}[dtype]
                    floor = floor_bytes(arch, NUM_BASE, NUM_NEW, weight_bytes, args.loss_chunk)
            if wanted("run-traj"):
                table = {} if args.full_table else {"trajectory.table_neighbours": "false"}
                bench.wakelab(
                    f"run, default preset + --plugin trajectory{tag}",
                    [
                        "run",
                        "--no-progress",
                        *sets({**common, **table, "output_dir": out_traj}),
                        "--plugin",
                        "trajectory",
                    ],
                    note="" if args.full_table else "table_neighbours=false (see the search row)",
                )
            if wanted("search") and dtype == dtypes[0]:
                cmd = [sys.executable, __file__, "--search-worker", str(arch["hidden_size"]), str(args.search_words)]
                rc, output, peak_kib, wall = measure(cmd, env=bench.env)
                if rc != 0:
                    sys.stderr.write(output[-3000:])
                    raise SystemExit("the search worker failed")
                result = json.loads(output.strip().splitlines()[-1])
                label = f"top_k_cosine, {args.search_words:,} of {NUM_NEW:,} new x {NUM_BASE:,} base rows"
                whole = result["seconds"] * 2 * NUM_NEW / args.search_words / 60
                note = (f"search alone: +{result['extra_mib']:,.0f} MiB over the rows, {result['seconds']:.0f} s; "
                        f"all {NUM_NEW:,} words x 2 (start, end): ~{whole:.0f} min here")  # fmt: skip
                bench.rows.append((label, peak_kib / 1024, wall, note))
                print(f"{label:<52} peak RSS {peak_kib / 1024:>8,.0f} MiB  {wall:>6.0f} s  {note}", flush=True)
            if wanted("run-p1-plugins"):
                sentry = os.path.join(folder, f"sentry-{dtype}")
                bench.wakelab(
                    f"run, p1_evolved's plugins (recorder new, sentry){tag}",
                    [
                        "run",
                        "--no-progress",
                        *sets(
                            {
                                **common,
                                "output_dir": out_rec,
                                "recorder.rows": "new",
                                "recorder.fields": "[embeddings]",
                                "recorder.every": 1,
                                "recorder.dtype": "param",
                                "sentry.target": sentry,
                                "sentry.keep": 1,
                                "train.save_steps": max(args.steps - 1, 1),
                            }
                        ),
                        "--set",
                        "plugins=[recorder,sentry]",
                    ],
                )
            if wanted("analyze"):
                bench.wakelab(f"analyze{tag}", ["analyze", out_off])
            if wanted("analyze-recording"):
                bench.wakelab(
                    f"analyze --recording{tag}",
                    ["analyze", out_rec, "--recording"],
                )
            if wanted("export-hf"):
                bench.wakelab(f"export --format hf{tag}", ["export", out_off, "--to", out_off + "-hf"])
                shutil.rmtree(out_off + "-hf", ignore_errors=True)
            if wanted("export-peft"):
                bench.wakelab(
                    f"export --format peft{tag}", ["export", out_off, "--to", out_off + "-peft", "--format", "peft"]
                )
                shutil.rmtree(out_off + "-peft", ignore_errors=True)
            if wanted("generate"):
                bench.wakelab(f"generate{tag}", ["generate", out_off, PROMPT, "--max-new-tokens", "8"])
            if wanted("sweep"):
                constituents = os.path.join(folder, "constituents.tsv")
                with open(constituents, "w", encoding="utf-8") as f:  # meaning and parts: plain English words
                    for i, word in enumerate(words[:1000]):
                        f.write(f"{word}\t{('river', 'house', 'light')[i % 3]}\tthe and\n")
                bench.wakelab(
                    f"sweep, 2 children + comparison{tag}",
                    [
                        "sweep",
                        "--no-progress",
                        "--over",
                        "init=spherical,mean",
                        "--constituents",
                        constituents,
                        "--output-dir",
                        os.path.join(folder, f"sweep-{dtype}"),
                        *sets(common),
                        "--set",
                        "plugins=[]",
                    ],
                    note="plugins off; hit rates over 1,000 words",
                )
        layers = f"{args.layers} layers"
        print_table(
            bench,
            reference,
            floor,
            f"P1 proportions through the CLI: {NUM_BASE:,} base + {NUM_NEW:,} new rows, d={arch['hidden_size']}, "
            f"{layers}, seq 512 x batch 1, {args.steps} step(s), {', '.join(dtypes)}",
        )
    finally:
        with open(saved, "w") as f:
            json.dump(bench.rows, f)
        if not args.keep and not args.folder:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"kept {folder}")
    return 1 if bench.failed else 0


def materialize_worker(overrides: str) -> None:
    """Build the run's random-weights model folder as `wakelab run` would (same config, same cache key)."""
    from wakelab.config import build_config
    from wakelab.model import model_source

    config = build_config("demo", overrides=[f"{k}={v}" for k, v in json.loads(overrides).items()])
    print(model_source(config.model, config.train.seed))


def search_worker(hidden: int, words: int) -> None:
    """The trajectory table's neighbour search at P1's size, alone: base rows as in the model (fp32), ``words`` new
    rows as queries; prints the RSS it added over the rows and its time (memory does not grow with ``words``)."""
    import torch
    from p1_shape import proc_status_kib, reset_peak_rss

    from wakelab.analysis.embeddings import top_k_cosine

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(NUM_BASE, hidden, generator=generator)
    queries = torch.randn(words, hidden, generator=generator)
    before = proc_status_kib("VmRSS")
    reset_peak_rss()
    started = time.monotonic()
    top_k_cosine(queries, base, 5)
    seconds = time.monotonic() - started
    extra = (proc_status_kib("VmHWM") - before) / 1024
    print(json.dumps({"extra_mib": extra, "seconds": seconds}))


def wide(args) -> int:
    folder = tempfile.mkdtemp(prefix="wakelab-wide-")
    bench = Bench(args, folder)
    try:
        lexicon, corpus, _, _ = prepare(args, folder, NUM_NEW)
        arch = {
            "model_type": "llama",
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": True,
        }
        common = run_overrides(args, arch, lexicon, corpus, num_base=50257, seq=512, batch=4)
        common.pop("train.eval_max_blocks")  # the preset's
        off, _ = bench.wakelab(
            "run, --set trajectory.enabled=false",
            ["run", "--no-progress", *sets({**common, "output_dir": f"{folder}/off", "trajectory.enabled": "false"})],
        )
        on, _ = bench.wakelab(
            "run, default preset (trajectory on)",
            ["run", "--no-progress", *sets({**common, "output_dir": f"{folder}/on"})],
        )
        ratio = on / 1024 / TARGET_WIDE
        print(
            f"\nwide run, trajectory on: {on / 1024:.2f} GiB = {on / 1024 / 3.26:.2f} x 3.26 GiB (target <= 0.6) "
            f"{'PASS' if ratio <= 1 else 'FAIL'}; trajectory on / off = {on / off:.2f}"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if bench.failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="2 (default) or 16 (Llama-3.2-1B's depth)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 3; 1 at 16 layers)")
    parser.add_argument("--dtypes", default=None, help="float32,bf16,nf4 (default float32; bf16,nf4 at 16 layers)")
    parser.add_argument("--only", default=None, help="comma-separated rows: run-off,run-traj,search,run-p1-plugins,"
                        "analyze,analyze-recording,export-hf,export-peft,generate,sweep")  # fmt: skip
    parser.add_argument("--eval-blocks", type=int, default=2, help="train.eval_max_blocks (held-out blocks scored)")
    parser.add_argument("--corpus-bytes", type=int, default=60_000, help="demo text used for the corpus")
    parser.add_argument("--loss-chunk", type=int, default=256, help="train.loss_chunk_tokens (the floor's chunk)")
    parser.add_argument("--hidden", type=int, default=2048, help="2048 (Llama-3.2-1B); smaller: a quick smoke test")
    parser.add_argument("--wide", action="store_true", help="the issue's 50,257 + 44,195, d=256 run instead")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folder")
    parser.add_argument(
        "--probe",
        action="append",
        default=[],
        metavar="PLUGIN",
        help="a plugin file added to the plugins-off run (benchmarks/memprobe_plugin.py: what the peak is made of)",
    )
    parser.add_argument("--folder", default=None, help="runs' folder, kept; again: later rows reuse the runs in it")
    parser.add_argument("--no-eval", action="store_true", help="train.eval_perplexity=false (no held-out passes)")
    parser.add_argument("--full-table", action="store_true", help="the trajectory run lists every word's neighbours")
    parser.add_argument("--search-words", type=int, default=2048, help="queries of the direct search row")
    parser.add_argument("--search-worker", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--materialize-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/wakelab-bench"), help="WAKELAB_CACHE")
    args = parser.parse_args()
    if args.materialize_worker:
        materialize_worker(args.materialize_worker)
        return 0
    if args.search_worker:
        search_worker(*args.search_worker)
        return 0
    os.environ["WAKELAB_CACHE"] = args.cache  # the tokenizer built here and the runs share one cache
    if args.steps is None:
        args.steps = 3 if args.wide or args.layers <= 2 else 1
    if args.layers > 2 and args.only is None and not args.wide:
        args.only = "run-off,run-traj"
    print(f"CPU: {cpu_capability()}, {os.cpu_count()} cores; cache {args.cache}", flush=True)
    return wide(args) if args.wide else p1(args)


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


if __name__ == "__main__":
    raise SystemExit(main())
