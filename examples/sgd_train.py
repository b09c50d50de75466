"""A small training job for examples/gpujob-sgd.yaml: linear regression by minibatch SGD in
numpy, on the CPU, that saves a checkpoint every ``--every`` steps and on SIGTERM, and resumes
from its last one.

What a GpuJob is asked to do, in ~80 lines: gpufleet hands it ``GPUFLEET_CHECKPOINT_DIR``;
when serving needs the GPUs back it sends SIGTERM and waits ``checkpoint.graceSeconds`` before
SIGKILL; the next attempt (``GPUFLEET_RESUMED=1``) finds the checkpoint there. Each step's
minibatch comes from a generator seeded by the step's number, so a run preempted and resumed
any number of times ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import numpy as np

FEATURES, SAMPLES, BATCH = 32, 4096, 64


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, FEATURES))
    y = x @ rng.normal(size=FEATURES) + 0.01 * rng.normal(size=SAMPLES)
    return x, y


def save(directory: Path, step: int, w: np.ndarray) -> None:
    """Write the checkpoint beside the old one, then rename it over: a SIGKILL mid-write
    leaves the previous checkpoint whole."""
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / "checkpoint.partial.npz"
    with partial.open("wb") as f:
        np.savez(f, step=step, w=w)
    partial.replace(directory / "checkpoint.npz")


def load(directory: Path) -> tuple[int, np.ndarray]:
    path = directory / "checkpoint.npz"
    if not path.exists():
        return 0, np.zeros(FEATURES)
    with np.load(path) as saved:
        return int(saved["step"]), saved["w"].copy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--every", type=int, default=1_000, help="steps between checkpoints")
    parser.add_argument("--rate", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=Path("weights.npy"))
    args = parser.parse_args()

    checkpoints = Path(os.environ.get("GPUFLEET_CHECKPOINT_DIR", "checkpoint"))
    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    x, y = data()
    step, w = load(checkpoints)
    resumed = os.environ.get("GPUFLEET_RESUMED") == "1"
    print(f"{'resuming' if resumed else 'starting'} at step {step}", flush=True)
    while step < args.steps:
        batch = np.random.default_rng(step + 1).integers(0, SAMPLES, BATCH)
        xb, yb = x[batch], y[batch]
        w -= args.rate * 2 * xb.T @ (xb @ w - yb) / BATCH
        step += 1
        if stop:
            save(checkpoints, step, w)
            print(f"SIGTERM: checkpoint at step {step}", flush=True)
            return 128 + signal.SIGTERM
        if step % args.every == 0:
            save(checkpoints, step, w)
    np.save(args.out, w)
    loss = float(np.mean((x @ w - y) ** 2))
    print(f"done: {step} steps, loss {loss:.6g}, weights in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
