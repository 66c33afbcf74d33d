"""What storing the teacher's outputs with its trajectory states saves per stage-1 step, measured on this machine.

    python benchmarks/stored_teacher_states.py                  # embedded model, batch 64, 2 threads
    python benchmarks/stored_teacher_states.py --threads 1 --rounds 10

One batch of teacher trajectory states (the embedded base's own CFG runs), then one training step (loss, backward
into the guide) timed in turns: the teacher's outputs read from the batch, as `distill` does at trajectory states
without `--negatives`, and the teacher called on the batch, as before they were stored. Per guide input; the median
of `--rounds` alternating rounds, so both arms see the same machine load. The prompts are encoded per step in both.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from pnpguide.conditioning import encode_negative, encode_prompts
from pnpguide.distill_guidance import GuidanceDistillConfig, _noisy_batch, distillation_loss
from pnpguide.guide import GuideModel
from pnpguide.loading import load_pipeline
from pnpguide.sources import shapes_captions, teacher_trajectories
from pnpguide.training import make_accelerator

RECORDED = ("unconditional", "conditional")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per guide (default: 6)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(None)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    with tempfile.TemporaryDirectory() as folder:
        config = GuidanceDistillConfig(output_dir=folder, source="trajectories", trajectories=args.batch_size, max_steps=1)
        pool = teacher_trajectories(pipe, shapes_captions(256, seed=7), f"{folder}/trajectories", config, make_accelerator(config),
                                    first_steps=5)
        rows = _noisy_batch(pool.rows(torch.randperm(len(pool))[: args.batch_size]), pipe.scheduler, config, torch.Generator())
    negative = encode_negative(pipe, "cpu", resolution)
    prompts = rows.pop("prompts")

    def step(guide, stored: bool) -> float:
        batch = rows if stored else {k: v for k, v in rows.items() if k not in RECORDED}
        start = time.perf_counter()
        batch = batch | {"conditioning": encode_prompts(pipe, prompts, "cpu", resolution)}
        distillation_loss(pipe.unet, guide, batch, negative, "none").backward()
        return time.perf_counter() - start

    print(f"| guide reads | s / step, teacher called | s / step, teacher's outputs stored | speed-up | batch {args.batch_size}, {args.threads} threads |")
    print("|---|---|---|---|---|")
    for reads in ("latent", "unet_output"):
        guide = GuideModel.from_unet(pipe.unet, "tiny", reads=reads)
        step(guide, True), step(guide, False)  # warm-up
        times = {True: [], False: []}
        for _ in range(args.rounds):
            for stored in (False, True):
                times[stored].append(step(guide, stored))
        called, stored = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {reads} | {called:.3f} | {stored:.3f} | {called / stored:.1f}x | |", flush=True)


if __name__ == "__main__":
    main()
