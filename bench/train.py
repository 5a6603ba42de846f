"""Cost of training and evaluation on this machine, from a cold cache.

    python -m bench.train [--data DIR] [--epochs N]

Prints: full-training wall time (goal <= 15 min), its peak resident memory (goal
<= 4 GB) and the wall time of evaluating the test split with no cache (goal <= 20 s).
The trained checkpoint goes to a temporary folder (or --out); the bundled one is not
touched unless --out names it.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from model.settings import DEFAULT_CHECKPOINT, REPO_ROOT, data_dir


def run(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO_ROOT, check=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=data_dir())
    parser.add_argument("--epochs", type=int, default=None, help="default: the training script's")
    parser.add_argument("--skip-training", action="store_true", help="only time evaluation")
    parser.add_argument("--out", type=Path, default=None, help="keep the trained checkpoint here (default: discard)")
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        print(f"dataset not found at {args.data}: set CHEST_XRAY_DATA")
        return 2
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_training:
            out = args.out or Path(tmp) / "ck.pt"
            cmd = [python, "-m", "training.train", "--data", str(args.data), "--out", str(out),
                   "--cache-dir", f"{tmp}/cache"]
            if args.epochs:
                cmd += ["--epochs", str(args.epochs)]
            train_s = run(cmd)
            peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
            print(f"training, cold cache: {train_s / 60:.1f} min wall (goal <= 15), "
                  f"peak RSS {peak_gb:.2f} GB (goal <= 4)")
        checkpoint = args.out or DEFAULT_CHECKPOINT
        eval_s = run([python, "-m", "training.evaluate", "--data", str(args.data), "--checkpoint",
                      str(checkpoint), "--no-cache"])
        print(f"evaluation of the test split, no cache: {eval_s:.1f} s wall including start-up (goal <= 20)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
