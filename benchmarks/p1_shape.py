"""What the P1-proportion benchmarks (`tokens_vs_mask.py`, `full_width.py`, `p1_cli.py`) share: the vocabulary
split, random blocks with a share of new ids, the quiet engine wiring of ``WakelabTrainer``, the process's memory
figures, a wide lexicon and corpus for `wakelab run`, and one command measured as a subprocess.

Imported by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path``).
"""

from __future__ import annotations

NUM_BASE = 128_256
NUM_NEW = 44_195


def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def random_blocks(count: int, seq_len: int, new_share: float, seed: int = 1):
    """``count`` blocks of random base ids with about ``new_share`` of them new ids: (ids, BlockDataset)."""
    import numpy as np
    import torch

    from wakelab.data.corpus import BlockDataset

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, NUM_BASE, (count, seq_len), generator=gen)
    is_new = torch.rand((count, seq_len), generator=gen) < new_share
    ids[is_new] = torch.randint(NUM_BASE, NUM_BASE + NUM_NEW, (int(is_new.sum()),), generator=gen)
    return ids, BlockDataset(ids.numpy().astype(np.int64))


def quiet_bridge(trainer_ref, output_dir: str):
    """The engine's ``HookBridge`` with nothing logged: the hooks run as in ``wakelab run``, without MLflow."""
    from wakelab.run.trainer import HookBridge

    return HookBridge(
        trainer_ref=trainer_ref,
        on_start=lambda optimizer: None,
        log_metrics=lambda metrics, step: None,
        extra_metrics=lambda: {},
        output_dir=output_dir,
        run_id=None,
    )


def adam_state(trainer) -> tuple[int, int]:
    """(bytes, parameter tensors) of Adam's ``exp_avg`` + ``exp_avg_sq`` in the trainer's optimizer."""
    optimizer = trainer.optimizer
    while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer wraps the torch one
        optimizer = optimizer.optimizer
    state_bytes = state_tensors = 0
    for state in optimizer.state.values():
        keys = [k for k in ("exp_avg", "exp_avg_sq") if k in state]
        state_bytes += sum(state[k].numel() * state[k].element_size() for k in keys)
        state_tensors += bool(keys)
    return state_bytes, state_tensors


def coined_words(n: int, seed: int = 7) -> list[str]:
    """n distinct lowercase pseudo-words (Wake-like blends of syllables), deterministic."""
    import random

    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ou", "ee", "ai")]
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(3, 5))))
    return sorted(words)


def wide_inputs(folder: str, count: int = NUM_NEW, corpus_bytes: int | None = None) -> tuple[str, str, list[str]]:
    """A lexicon of ``count`` coined words and a corpus (the demo text with a coined word in every sentence, cut to
    about ``corpus_bytes`` when given), written into ``folder``: (lexicon path, corpus path, words)."""
    import os
    import random

    from wakelab.data.demo import ensure_demo_texts

    words = coined_words(count)
    lexicon = os.path.join(folder, "lexicon.txt")
    with open(lexicon, "w", encoding="utf-8") as f:
        f.write("\n".join(words) + "\n")
    demo = open(ensure_demo_texts().corpus, encoding="utf-8").read()
    if corpus_bytes is not None:
        demo = demo[:corpus_bytes]
    rng = random.Random(3)
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write(" ".join(s + " " + rng.choice(words) + "." for s in demo.split(". ")))
    return lexicon, corpus, words


def measure(cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> tuple[int, str, int, float]:
    """Run ``cmd`` as a subprocess: (exit status, its output, its peak RSS in KiB from ``wait4``, wall seconds).

    ``ru_maxrss`` from ``wait4`` covers the process and the children it waited for (a sweep's), each counted alone:
    the largest single process, which is what has to fit in memory.

    With ``P1_RSS_PROFILE`` set in the environment, the process's own ``/proc/<pid>/status`` is read every 50 ms
    and, after it ends, one line says what its largest sample held: anonymous memory (what no reclaim can take
    back) against mapped file pages, and the last line the command printed before it (which phase it was in)."""
    import os
    import subprocess
    import threading
    import time

    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    lines: list[tuple[float, str]] = []
    samples: list[tuple[float, dict[str, int]]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            fields = _status_fields(proc.pid)
            if fields:
                samples.append((time.monotonic(), fields))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True) if os.environ.get("P1_RSS_PROFILE") else None
    if sampler:
        sampler.start()
    for line in proc.stdout:
        lines.append((time.monotonic(), line))
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    output = "".join(line for _, line in lines)
    keep = os.environ.get("P1_RSS_PROFILE", "")
    if sampler and os.path.isdir(keep):  # a folder: each command's whole output is kept there too
        with open(
            os.path.join(keep, f"{proc.pid}-{os.path.basename(cmd[2] if len(cmd) > 2 else cmd[0])}.log"), "w"
        ) as f:
            f.write(output)
    if sampler and samples:
        sampler.join()
        at, top = max(samples, key=lambda s: s[1].get("VmRSS", 0))
        before = [line.strip() for t, line in lines if t <= at and line.strip()]
        import sys

        command = " ".join(os.path.basename(part) for part in cmd[:3])
        sys.stderr.write(
            f"[rss profile] {command}: largest sample {top.get('VmRSS', 0) // 1024:,} MiB at {at - started:.1f} s: "
            f"anonymous {top.get('RssAnon', 0) // 1024:,} MiB, file pages {top.get('RssFile', 0) // 1024:,} MiB, "
            f"shared memory {top.get('RssShmem', 0) // 1024:,} MiB; last line before it: "
            f"{before[-1][:160] if before else '(none)'}\n"
        )
        # Each printed line's phase (until the next line): its largest sample, for the phases that came near the peak.
        marks = [started] + [t for t, _ in lines] + [float("inf")]
        texts = ["(start)"] + [line.strip()[:120] for _, line in lines]
        for i, text in enumerate(texts):
            inside = [f["VmRSS"] for t, f in samples if marks[i] <= t < marks[i + 1] and "VmRSS" in f]
            if inside and max(inside) >= 0.8 * top.get("VmRSS", 0):
                sys.stderr.write(f"[rss profile]    {max(inside) // 1024:,} MiB after: {text}\n")
    return os.waitstatus_to_exitcode(status), output, usage.ru_maxrss, time.monotonic() - started


def _status_fields(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmRSS, RssAnon, RssFile, RssShmem), or {} once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0])
    return fields
