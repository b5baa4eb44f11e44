"""What the `trajectory` plugin costs at the demo shape, and how big and quick the page is. Prints figures; asserts
nothing.

1. Live cost, logging every 10 steps                                                         [<= 2 % of step time]
   A Llama with SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 KV heads, vocab 49,152 + 223 new tokens,
   tied embeddings), built from a config (no download), trains only the new rows (base frozen) on random batches of
   4 x 128 tokens with AdamW: the demo's `train.trainable=tokens` step. Paired in one loop: each round times one
   training step and then one capture as the plugin does it every 10th step (project all new rows, nearest base
   tokens of the tracked ones, render the frame, `MlflowClient.log_image` into a temporary SQLite store). The
   figure is median(capture) / (10 x median(step)).
2. The page for 1,000 tracked tokens x 100 frames (plus 2,000 backdrop rows and 5 neighbours per token per frame):
   its size, the time to write it, and the time to parse its data in Python (json.loads, a lower bound on what a
   browser does before drawing; the browser test opens the real page).
3. (--scale) P1's row counts: 128,256 base rows, 44,195 new rows, 40 of them tracked with meaning words, the rest as
   density: the setup (both fixed projections), one frame, and the page's size.

    .venv/bin/python benchmarks/trajectory.py                 # ~3-6 minutes on 2 busy CPU cores
    .venv/bin/python benchmarks/trajectory.py --rounds 3
    flock /tmp/wakelab-heavy.lock .venv/bin/python benchmarks/trajectory.py --scale   # 3. P1's row counts too
"""

from __future__ import annotations

import argparse
import atexit
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

NEW, VOCAB, HIDDEN, EVERY = 223, 49152, 576, 10


def _scratch() -> Path:
    """A temporary folder (MLflow store, page), deleted when the script ends."""
    folder = Path(tempfile.mkdtemp(prefix="wakelab-bench-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def demo_shaped_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB + NEW, hidden_size=HIDDEN, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256,
                         tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def live_cost(rounds: int) -> dict[str, float]:
    import mlflow

    from wakelab.analysis.trajectory.stills import frame_image
    from wakelab.analysis.trajectory.watch import log_frame, start_watch

    model = demo_shaped_model()
    weight = model.get_input_embeddings().weight
    weight.requires_grad_(False)
    for p in model.parameters():
        p.requires_grad_(False)
    new_rows = torch.nn.Parameter(weight[VOCAB:].clone())
    optimizer = torch.optim.AdamW([new_rows], lr=5e-3)
    batch = torch.randint(0, VOCAB + NEW, (4, 128), generator=torch.Generator().manual_seed(0))

    def step():
        full = torch.cat([weight[:VOCAB], new_rows])
        logits = model(inputs_embeds=torch.nn.functional.embedding(batch, full)).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    class Words:  # token text without a tokenizer: the cost is in the lookups, not in decoding
        def decode(self, ids):
            return f"t{ids[0]}"

    folder = _scratch()
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("bench")).info.run_id
    started = time.perf_counter()
    builder = start_watch(weight[:VOCAB], Words(), list(range(VOCAB, VOCAB + NEW)), new_rows.detach(), 0,
                          max_tokens=40)  # fmt: skip
    setup = time.perf_counter() - started

    def capture(at: int):
        builder.add(at, new_rows.detach())
        traj = builder.result()
        log_frame(client, run_id, frame_image(traj, len(traj) - 1), at)

    step()  # warm-up
    capture(1)
    steps, captures = [], []
    for i in range(rounds):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        capture((i + 2) * EVERY)
        t2 = time.perf_counter()
        steps.append(t1 - t0)
        captures.append(t2 - t1)
        print(f"  round {i + 1}: step {steps[-1]:.3f} s, capture {captures[-1] * 1000:.1f} ms", flush=True)
    return {"step_s": statistics.median(steps), "capture_s": statistics.median(captures), "setup_s": setup}


def page(tokens: int = 1000, frames: int = 100) -> dict[str, float]:
    from wakelab.analysis.trajectory.frames import Trajectory, View, label_order
    from wakelab.analysis.trajectory.page import write_html
    from wakelab.analysis.trajectory.projection import Projection

    rng = np.random.default_rng(0)
    xy = np.cumsum(rng.normal(size=(frames, tokens, 2)).astype(np.float32) * 0.05, axis=0)
    words = [f"word{i}" for i in range(tokens)]
    base_words = [f"base{i}" for i in range(49152)]
    neighbours = [[[base_words[j] for j in rng.integers(0, 49152, 5)] for _ in range(tokens)] for _ in range(frames)]
    projection = Projection(np.zeros(8, np.float32), np.eye(2, 8, dtype=np.float32), (0.1, 0.03))
    view = View(projection, xy, rng.normal(size=(2000, 2)).astype(np.float32), np.full((tokens, 2), np.nan, np.float32),
                extent=(-3.0, 3.0, -3.0, 3.0))  # fmt: skip
    movement = np.abs(xy[-1] - xy[0]).sum(1).tolist()
    traj = Trajectory(list(range(0, frames * 10, 10)), words, list(range(tokens)), [view], neighbours,
                      base_words[:2000], movement=movement, label_order=label_order(movement, []))  # fmt: skip
    folder = _scratch()
    t0 = time.perf_counter()
    path = write_html(traj, folder / "t.html")
    written = time.perf_counter() - t0
    text = path.read_text()
    data = re.search(r'<script id="data" type="application/json">(.*?)</script>', text, re.S).group(1)
    t0 = time.perf_counter()
    json.loads(data)
    parsed = time.perf_counter() - t0
    return {"mib": path.stat().st_size / 2**20, "write_s": written, "parse_s": parsed}


def scale(frames: int = 5, base: int = 128256, new: int = 44195, dim: int = 576) -> dict[str, float]:
    """P1's row counts (128,256 base + 44,195 new rows; hidden 576 to fit a shared machine): 40 tracked words with
    meaning words, the other 44,155 as density. Times the setup (both projections fitted, the focus one through a
    chunked top-k), one frame, and the page's size: only the tracked set is drawn, so it stays small."""
    from wakelab.analysis.trajectory.frames import TrajectoryBuilder
    from wakelab.analysis.trajectory.meaning import Meanings
    from wakelab.analysis.trajectory.page import write_html

    gen = torch.Generator().manual_seed(0)
    base_rows = torch.randn(base, dim, generator=gen)
    rows = torch.randn(new, dim, generator=gen) * 1.5
    tracked = list(range(40))
    meanings = Meanings([f"m{i}" for i in tracked], base_rows[tracked].clone(), [[i] for i in tracked])
    t0 = time.perf_counter()
    builder = TrajectoryBuilder(base_rows, lambda i: f"b{i}", tracked=tracked, tracked_words=[f"w{i}" for i in tracked],
                                meanings=meanings, projections=("focus", "base"))  # fmt: skip
    builder.add(0, rows)
    setup = time.perf_counter() - t0
    times = []
    for k in range(1, frames):
        rows[:40] += 0.1 * (base_rows[:40] - rows[:40])
        t0 = time.perf_counter()
        builder.add(k * 10, rows)
        times.append(time.perf_counter() - t0)
    folder = _scratch()
    path = write_html(builder.result(), folder / "t.html")
    return {"setup_s": setup, "frame_s": statistics.median(times), "mib": path.stat().st_size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="paired step/capture rounds")
    parser.add_argument("--scale", action="store_true", help="also time P1's row counts (needs ~1 GiB)")
    args = parser.parse_args()
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")
    live = live_cost(args.rounds)
    share = live["capture_s"] / (EVERY * live["step_s"])
    verdict = "PASS" if share <= 0.02 else "FAIL"
    print(f"1. live cost: step {live['step_s']:.3f} s, capture {live['capture_s'] * 1000:.1f} ms (median of "
          f"{args.rounds}); every {EVERY} steps = {share:.2%} of step time [<= 2 %] {verdict}"
          f"; one-off setup (projection, first frame) {live['setup_s']:.2f} s")  # fmt: skip
    if args.scale:
        big = scale()
        print(f"3. P1 row counts (128,256 base + 44,195 new, hidden 576), 40 tracked with meaning words: setup (both "
              f"projections) {big['setup_s']:.1f} s, one frame {big['frame_s']:.2f} s, page {big['mib']:.2f} MiB "
              "for 5 frames")  # fmt: skip
    figures = page()
    print(f"2. page, 1,000 tokens x 100 frames: {figures['mib']:.1f} MiB, written in {figures['write_s']:.2f} s, "
          f"data parsed in {figures['parse_s'] * 1000:.0f} ms (json.loads)")  # fmt: skip


if __name__ == "__main__":
    main()
