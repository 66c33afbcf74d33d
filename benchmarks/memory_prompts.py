"""Peak memory of `pnpguide distill --source trajectories` against the number of prompts (embedded model, CPU).

Each size runs in its own process: collect one teacher trajectory per prompt (a few DDIM steps, written to
shards on disk), then a few training steps that stream batches from those shards. The child reports its own
peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`); the parent prints both and their ratio. Before the
sharded sources, every state and a prompt-embedding table were held in memory, so the peak grew with the
number of prompts; the target is a ratio within 1.2.

    python benchmarks/memory_prompts.py                # 2,000 vs 20,000 prompts, one thread each
    python benchmarks/memory_prompts.py --sizes 200 2000 --steps 2
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star")


def write_prompts(path: Path, count: int) -> Path:
    """`count` distinct prompts in the shapes vocabulary (plus a number, so no two are equal)."""
    lines = [f"a {COLOURS[i % 8]} {SHAPES[i // 8 % 4]} above a {COLOURS[i // 32 % 8]} {SHAPES[i // 256 % 4]} number {i}" for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def child(count: int, steps: int, train_steps: int, folder: Path) -> None:
    """Run the distillation in this process, then print its peak RSS in MiB."""
    from pnpguide.cli import main

    prompts = write_prompts(folder / "prompts.txt", count)
    argv = ["--threads", "1", "distill", "--prompts", str(prompts), "--trajectories", str(count), "--trajectory-steps", str(steps),
            "--max-steps", str(train_steps), "--batch-size", "32", "--checkpointing-steps", str(train_steps), "--output-dir", str(folder / "run")]
    started = time.time()
    code = main(argv)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    print(f"RESULT {count} {peak_mib:.1f} {time.time() - started:.1f} {code}")


def measure(count: int, steps: int, train_steps: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, __file__, "--child", str(count), "--steps", str(steps), "--train-steps", str(train_steps), "--folder", folder]
        result = subprocess.run(command, capture_output=True, text=True)
    line = next((l for l in result.stdout.splitlines() if l.startswith("RESULT")), None)
    if line is None or not line.endswith(" 0"):
        raise SystemExit(f"the run with {count} prompts failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    _, _, peak, seconds, _ = line.split()
    return float(peak), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000], help="the two prompt counts (default: 2000 20000)")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps per teacher trajectory (default: 2)")
    parser.add_argument("--train-steps", type=int, default=5, help="training steps after collection (default: 5)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child, args.steps, args.train_steps, args.folder)
    results = [measure(count, args.steps, args.train_steps) for count in args.sizes]
    print("| prompts (= trajectories) | peak RSS (MiB) | wall time (s) |\n|---|---|---|")
    for count, (peak, seconds) in zip(args.sizes, results):
        print(f"| {count:,} | {peak:.0f} | {seconds:.0f} |")
    print(f"\npeak RSS ratio {args.sizes[1]:,} / {args.sizes[0]:,} prompts: {results[1][0] / results[0][0]:.3f}")


if __name__ == "__main__":
    main()
