"""A small deterministic training job for the tests of GPU jobs: linear regression by SGD (numpy).

What the tests rely on:

- **Bit-identical results, interrupted or not.** The data come from a fixed seed; the minibatch
  of step ``s`` is drawn from ``default_rng([seed, s])``, a function of the step alone. So the
  only training state is (step, weights, bias) — the RNG's state *is* the step — and a run
  resumed from any checkpoint takes exactly the batches an uninterrupted run takes. The final
  weights are written as JSON, whose floats (Python's shortest round-trip repr) are exact.
- **Checkpoints** in ``$GPUFLEET_CHECKPOINT_DIR/checkpoint.npz`` every ``--checkpoint-every``
  steps and on SIGTERM, atomically (temporary file, fsync, rename): a reader or a resumed run
  sees the old checkpoint or the new one, never half of one. With ``GPUFLEET_RESUMED=1`` the
  job starts from the checkpoint (from step 0 if there is none yet).
- **Progress** in ``progress.json`` beside it, rewritten at every checkpoint and when holding:
  what a test waits on instead of sleeping.
- ``--hold-at-step H``: after step H, wait for SIGTERM — a job that is mid-run at a known step
  when it is preempted, with no race against its own end. Only a fresh start holds: a resumed
  attempt, given the same command, runs to the end.
- ``--ignore-sigterm``: SIGTERM is ignored (no checkpoint; a held job stays held), so only the
  runner's SIGKILL after the grace period ends it.
- ``--crash-at-step N``: after step N, a message on stderr and exit code 3.

Exit codes: 0 finished, 3 crashed on purpose, 143 (128 + SIGTERM) saved and stopped on SIGTERM.
A few thousand steps take well under a second after numpy's import.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

SEED = 20240622
SAMPLES, FEATURES, BATCH = 2048, 8, 32
LEARNING_RATE = 0.01
CHECKPOINT = "checkpoint.npz"
PROGRESS = "progress.json"


class Stop:
    """Set by the SIGTERM handler; the loop checks it after every step."""

    requested = False


def on_sigterm(signum: int, frame: object) -> None:
    Stop.requested = True


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="final weights (JSON)")
    p.add_argument("--steps", type=int, default=int(os.environ.get("SGD_STEPS", "3000")))
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--hold-at-step", type=int, default=None)
    p.add_argument("--crash-at-step", type=int, default=None)
    p.add_argument("--ignore-sigterm", action="store_true")
    return p.parse_args(argv)


def dataset() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((SAMPLES, FEATURES))
    true_w = rng.uniform(-2.0, 2.0, FEATURES)
    y = x @ true_w + 0.5 + 0.01 * rng.standard_normal(SAMPLES)
    return x, y


def sgd_step(step: int, w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray) -> tuple[Any, float]:
    batch = np.random.default_rng([SEED, step]).integers(0, SAMPLES, BATCH)
    err = x[batch] @ w + b - y[batch]
    return w - LEARNING_RATE * (x[batch].T @ err) / BATCH, b - LEARNING_RATE * float(err.mean())


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def save_checkpoint(ckpt_dir: Path, step: int, w: np.ndarray, b: float) -> None:
    buf = io.BytesIO()
    np.savez(buf, step=np.int64(step), w=w, b=np.float64(b))
    write_atomically(ckpt_dir / CHECKPOINT, buf.getvalue())


def load_checkpoint(ckpt_dir: Path) -> tuple[int, np.ndarray, float] | None:
    path = ckpt_dir / CHECKPOINT
    if not path.exists():
        return None
    with np.load(path) as z:
        return int(z["step"]), z["w"].copy(), float(z["b"])


def report(ckpt_dir: Path, **progress: object) -> None:
    write_atomically(ckpt_dir / PROGRESS, json.dumps(progress).encode())


def hold(ignore_sigterm: bool) -> None:
    """Wait for SIGTERM (forever, if it is ignored) without a window in which one is lost."""
    if ignore_sigterm:
        while True:
            signal.pause()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # runs a pending handler first
    if not Stop.requested:
        signal.sigwait({signal.SIGTERM})
        Stop.requested = True
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    ckpt_dir = Path(os.environ["GPUFLEET_CHECKPOINT_DIR"])
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, on_sigterm)

    x, y = dataset()
    start, w, b = 0, np.zeros(FEATURES), 0.0
    resumed = os.environ.get("GPUFLEET_RESUMED") == "1"
    if resumed:
        saved = load_checkpoint(ckpt_dir)
        if saved is None:
            print("sgd: resumed, but no checkpoint yet: starting from step 0")
        else:
            start, w, b = saved
            print(f"sgd: resumed from step {start}")
    checkpointed = start
    print(f"sgd: training steps {start}..{args.steps}")

    for step in range(start, args.steps):
        w, b = sgd_step(step, w, b, x, y)
        done = step + 1
        if done == args.crash_at_step:
            print(f"sgd: simulated crash at step {done}", file=sys.stderr)
            return 3
        if done % args.checkpoint_every == 0:
            save_checkpoint(ckpt_dir, done, w, b)
            checkpointed = done
            loss = float(np.mean((x @ w + b - y) ** 2))
            print(f"sgd: step {done} loss {loss:.6f}: checkpoint saved")
            report(ckpt_dir, step=done, checkpoint_step=done, holding=False, resumed_from=start)
        if done == args.hold_at_step and not resumed:
            report(
                ckpt_dir, step=done, checkpoint_step=checkpointed, holding=True, resumed_from=start
            )
            print(f"sgd: holding at step {done} until SIGTERM")
            hold(args.ignore_sigterm)
        if Stop.requested:
            save_checkpoint(ckpt_dir, done, w, b)
            print(f"sgd: SIGTERM at step {done}: checkpoint saved, stopping")
            return 143

    result = {"steps": args.steps, "weights": [float(v) for v in w], "bias": b}
    write_atomically(args.out, json.dumps(result).encode())
    print(f"sgd: done after {args.steps} steps: weights in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
