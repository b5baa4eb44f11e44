"""SIGKILL inside checkpoint writes, at moments the writer confirms: resume always starts from the last complete
checkpoint and reproduces the uninterrupted run bit for bit, for `tokens` and for P1's `mask` with grad_accum > 1."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import pytest
from conftest import tiny_overrides

pytestmark = pytest.mark.slow

# One driver process imports wakelab once and forks a child per run: the driver itself runs no torch op, so forking
# is safe, and each run costs a fork instead of a fresh interpreter. A killed child stops at a named crash point
# (wakelab.storage.crashpoint): it leaves a marker saying where it is and waits; the driver kills it there with SIGKILL.
DRIVER = textwrap.dedent('''
    import json, os, shutil, signal, sys, time
    from pathlib import Path
    from wakelab.run import engine
    from wakelab.storage.checkpoints import latest_checkpoint, list_checkpoints, verify
    from wakelab.config import build_config
    from wakelab.storage.crashpoint import ENV_AT, ENV_MARKER

    overrides, plan, template_db = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]

    def compare(output_dir, reference):
        """In the resumed child (torch is safe there): final rows and the last checkpoint's every tensor."""
        import torch
        from safetensors.torch import load_file
        ours, theirs = Path(output_dir), Path(reference)
        same = {}
        a = load_file(str(ours / "final" / "new_rows.safetensors"))["rows"]
        b = load_file(str(theirs / "final" / "new_rows.safetensors"))["rows"]
        same["rows"] = torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        last = list_checkpoints(theirs)[-1].name
        for name in ("trained_rows.safetensors",):
            x, y = load_file(str(ours / last / name)), load_file(str(theirs / last / name))
            same[name] = all(torch.equal(x[k].view(torch.uint8), y[k].view(torch.uint8)) for k in y)
        x = torch.load(ours / last / "optimizer.pt", weights_only=True)["state"]
        y = torch.load(theirs / last / "optimizer.pt", weights_only=True)["state"]
        same["adam"] = set(x) == set(y) and all(torch.equal(x[k][n], y[k][n]) for k in y for n in y[k])
        same["scheduler"] = torch.load(ours / last / "scheduler.pt") == torch.load(theirs / last / "scheduler.pt")
        return same

    def child(output_dir, strategy, resume_from=None, crash=None, reference=None):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                db = Path(f"{output_dir}.db")
                if not db.exists():
                    shutil.copy(template_db, db)
                os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
                os.environ.pop(ENV_AT, None)
                if crash is not None:
                    os.environ[ENV_AT], os.environ[ENV_MARKER] = crash
                config = build_config(None, None, {**overrides[strategy], "output_dir": output_dir})
                engine.run(config, progress=False, resume_from=resume_from)
                if reference is not None:
                    Path(f"{output_dir}.same.json").write_text(json.dumps(compare(output_dir, reference)))
                code = 0
            except BaseException as exc:
                print(f"child failed: {exc!r}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        return pid

    def exit_code(pid):
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    for strategy in overrides:
        assert exit_code(child(f"reference-{strategy}", strategy)) == 0, f"{strategy}: the reference run failed"
    report = []
    for trial, (strategy, point, nth) in enumerate(plan):
        out, marker = f"trial{trial}", Path(f"trial{trial}.marker")
        pid = child(out, strategy, crash=(f"{point}:{nth}", str(marker.resolve())))
        deadline = time.monotonic() + 300
        while not marker.exists():
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                raise SystemExit(f"trial {trial}: the run ended (exit {os.waitstatus_to_exitcode(status)}) "
                                 f"without reaching {point}:{nth}")
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                raise SystemExit(f"trial {trial}: {point}:{nth} not reached in 300 s")
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
        status = exit_code(pid)
        assert status == -signal.SIGKILL, f"trial {trial}: the child exited with {status}, not by our SIGKILL"
        landed = marker.read_text()
        assert landed == f"{point}:{nth}", landed
        for folder in Path(out).glob("checkpoint-*"):
            verify(folder)  # complete or absent: never a half-written checkpoint-N
        leftovers = sorted("-".join(p.name.split("-")[:-2]) for p in Path(out).glob(".partial-*"))  # no step, pid
        complete = list_checkpoints(out)
        resume = str(latest_checkpoint(out)) if complete else None  # latest_checkpoint puts back what a kill left aside
        if resume is None:
            shutil.rmtree(out)
        code = exit_code(child(out, strategy, resume_from=resume, reference=f"reference-{strategy}"))
        assert code == 0, f"trial {trial}: resume from {resume} failed (exit {code})"
        same = json.loads(Path(f"{out}.same.json").read_text())
        after = {"checkpoints": [c.name for c in list_checkpoints(out)],
                 "leftovers": sorted(p.name for p in Path(out).glob(".partial-*"))}
        report.append({"trial": trial, "strategy": strategy, "landed": landed, "left": leftovers,
                       "resumed_from": resume, "same": same, **after})
    print(json.dumps(report))
''')

# Where a checkpoint can die (wakelab.storage.crashpoint): mid-write (rows on disk, optimizer not yet), every file but
# the manifest, complete but staged, published but not yet rotated, and an old checkpoint renamed aside for deletion.
POINTS = ["rows-written", "manifest-tmp", "staged", "published", "remove-aside"]


def crash_plan(seed: int = 1) -> list[list]:
    rng = random.Random(seed)
    plan = []
    for strategy in ("tokens", "mask"):
        for point in POINTS:
            # Saves every step (12) and rotation from the 4th: any of them; a few distinct checkpoints to resume from.
            plan.append([strategy, point, rng.randint(2, 8) if point == "remove-aside" else rng.randint(1, 11)])
    return plan


def test_sigkill_inside_checkpoint_writes_resumes_bit_exactly(tiny_model, texts, tmp_path, empty_mlflow_db):
    common = {
        "train.max_steps": 12,
        "train.save_steps": 1,
        "train.save_total_limit": 3,
        "train.logging_steps": 1,
        "train.eval_perplexity": False,
        "train.weight_decay": 0.1,
        "tracking.log_tokenizer": False,
    }
    overrides = {
        "tokens": tiny_overrides(tiny_model, texts, **common),
        # P1's way: the whole matrix trains, base grads masked, decay on new rows only, micro-batches accumulated.
        "mask": tiny_overrides(
            tiny_model,
            texts,
            **common,
            **{"train.trainable": "mask", "train.grad_accum": 2, "train.batch_size": 1, "train.scheduler": "cosine"},
        ),
    }
    plan = crash_plan()
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(overrides), json.dumps(plan), str(empty_mlflow_db)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(r["strategy"], r["landed"]) for r in report] == [(s, f"{p}:{n}") for s, p, n in plan]
    for r in report:
        assert all(r["same"].values()), r
        assert r["checkpoints"] == ["checkpoint-10", "checkpoint-11", "checkpoint-12"], r
        assert r["leftovers"] == [], r
    # A kill after the rename aside leaves the doomed checkpoint there, and resume finished deleting it.
    killed_deleting = [r["left"] for r in report if r["landed"].startswith("remove-aside")]
    assert killed_deleting and all(left == [".partial-del-checkpoint"] for left in killed_deleting), report
    # The kills landed at different points: several distinct resume checkpoints were used.
    assert len({r["resumed_from"] for r in report}) >= 4, report
