"""How close a shipped guide's images come to diffusers' CFG, measured as a user gets them.

The guide is loaded with `GuideModel.from_pretrained(name)` and sampled by `PlugAndPlayPipeline` with no argument but the
prompt, the seed and w: its folder's own policy and step count. CFG and no guidance are diffusers' own
`StableDiffusionPipeline` at the same steps and seeds. Image gap closed = 1 - MSE(guide, CFG) / MSE(no guidance, CFG),
pooled over the images, on [0, 1] pixels; the JSON also gives it apart for the one-object and the two-object half of the
captions (a guide can fit one kind of prompt worse than the other).

    python benchmarks/image_gap.py --guide default --prompts 48 --scales 3 5 7.5 --out gap.json
    python benchmarks/image_gap.py --guide default --policies carry:5 ag:0.99 ag+carry:0.99   # and the training-free paths
    python benchmarks/image_gap.py --guide 8-step 4-step --reference-steps 50   # few-step guides against 50-step CFG

`--policies` adds CFG-mode rows with no guide: `carry:K` (CFG for K steps, then its correction carried, with a carry fitted on
16 training captions as `pnpguide fit-carry` fits it), `ag:T` (Adaptive Guidance at cosine threshold T), `ag+carry:T`
(Adaptive Guidance, the correction carried after each image's CFG steps). They sample the guide's step count (25).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from pnpguide import CorrectionCarry, GuidancePolicy, GuideModel, PlugAndPlayPipeline
from pnpguide.embedded import shapes
from pnpguide.embedded.adherence import parse_caption
from pnpguide.loading import default_base_dir
from pnpguide.quiet import quiet_component_types




def sample(pipe, prompts: list[str], w: float, steps: int | None, batch_size: int, seed: int, **call) -> np.ndarray:
    """Image i from the generator seeded seed + i, whatever the batch."""
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        extra = {} if steps is None else {"num_inference_steps": steps}
        images.append(pipe(batch, guidance_scale=w, generator=generators, output_type="np", **extra, **call).images)
    return np.concatenate(images)


def training_free(spec: str, carry: CorrectionCarry) -> GuidancePolicy:
    """A `--policies` entry as the policy a user would pass: carry:K, ag:T or ag+carry:T."""
    kind, _, value = spec.partition(":")
    if kind == "carry":
        return GuidancePolicy(carry=carry.with_full_steps(int(value)))
    if kind in ("ag", "ag+carry"):
        return GuidancePolicy(adaptive_threshold=float(value), carry=carry if kind == "ag+carry" else None)
    raise ValueError(f"--policies takes carry:K, ag:T or ag+carry:T, got {spec!r}")


def gap_closed(method: np.ndarray, cfg: np.ndarray, unguided: np.ndarray) -> float:
    return float(1 - np.mean((method - cfg) ** 2) / np.mean((unguided - cfg) ** 2))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guide", nargs="+", default=["default"], help="shipped guide names or folders (default: default)")
    parser.add_argument("--prompts", type=int, default=48, help="held-out captions, half with one object and half with two (default: 48)")
    parser.add_argument("--scales", type=float, nargs="+", default=[3.0, 5.0, 7.5], help="guidance scales w (default: 3 5 7.5)")
    parser.add_argument("--policies", nargs="*", default=[], help="training-free CFG-mode rows: carry:K, ag:T, ag+carry:T (default: none)")
    parser.add_argument("--steps", type=int, default=None, help="sample every row at this many steps instead of the guide's own "
                        "(a guide's carry is then read at these steps' timesteps) (default: the guide's own; 25 for --policies)")
    parser.add_argument("--reference-steps", type=int, default=None, help="CFG and no guidance at this many steps as the "
                        "reference (e.g. 50 for the few-step guides) (default: the row's own step count)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--plot", default=None, help="PNG file: each row's image gap per w, for one- and two-object captions")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = shapes.evaluation_captions(args.prompts)
    objects = np.array([len(parse_caption(prompt).objects) for prompt in prompts])
    kinds = {"one object": objects == 1, "two objects": objects == 2}
    with quiet_component_types():
        diffusers_pipe = StableDiffusionPipeline.from_pretrained(default_base_dir())
    diffusers_pipe.set_progress_bar_config(disable=True)
    results = {"prompts": len(prompts), "seed": args.seed, "rows": []}
    passes = []
    diffusers_pipe.unet.register_forward_hook(lambda module, inputs, output: passes.append(inputs[0].shape[0]))
    print("| method | steps | UNet passes / CFG's | " + " | ".join(f"image gap closed, w = {w:g}" for w in args.scales) + " | s |")
    print("|---|---|---|" + "---|" * len(args.scales) + "---|")
    references: dict = {}  # (steps, w) -> (CFG's images, no guidance's)

    def measure(label: str, pipe, steps: int, call_steps: int | None, **call) -> None:
        start, gaps, by_kind, reference = time.perf_counter(), {}, {}, args.reference_steps or steps
        for w in args.scales:
            if (reference, w) not in references:
                references[(reference, w)] = (sample(diffusers_pipe, prompts, w, reference, args.batch_size, args.seed),
                                              sample(diffusers_pipe, prompts, 1.0, reference, args.batch_size, args.seed))
            cfg, unguided = references[(reference, w)]
            passes.clear()
            images = sample(pipe, prompts, w, call_steps, args.batch_size, args.seed, **call)
            gaps[w] = gap_closed(images, cfg, unguided)
            by_kind[w] = {kind: gap_closed(images[rows], cfg[rows], unguided[rows]) for kind, rows in kinds.items()}
            ratio = sum(passes) / (2 * steps * len(prompts))
        results["rows"].append({"method": label, "steps": steps, "reference_steps": reference, "unet_passes_over_cfg": ratio,
                                "unet_passes_per_image": ratio * 2 * steps, "image_gap_closed": gaps,
                                "image_gap_closed_by_kind": by_kind})
        print(f"| {label} | {steps} | {ratio:.2f} | " + " | ".join(f"{gaps[w]:.3f}" for w in args.scales) + f" | {time.perf_counter() - start:.0f} |",
              flush=True)

    for name in args.guide:
        guide = GuideModel.from_pretrained(name)
        pipe = PlugAndPlayPipeline.from_pipe(diffusers_pipe, guide=guide)
        pipe.set_progress_bar_config(disable=True)
        steps = args.steps or guide.policy.num_inference_steps or 50  # by default the guide's own policy and step count
        measure(f"guide {name}", pipe, steps, args.steps)
    if args.policies:
        plain = PlugAndPlayPipeline.from_pipe(diffusers_pipe)
        plain.set_progress_bar_config(disable=True)
        carry = CorrectionCarry.fit(plain, shapes.split_captions(16, split="train", seed=7), num_inference_steps=args.steps or 25)
        for spec in args.policies:
            measure(f"cfg {spec}", plain, args.steps or 25, args.steps or 25, mode="cfg", policy=training_free(spec, carry))
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)
    if args.plot:
        plot_by_kind(results["rows"], args.scales, args.plot)
    return results


def plot_by_kind(rows: list[dict], scales: list[float], path: str) -> None:
    """One panel per kind of caption: each row's image gap closed at each w, as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(rows[0]["image_gap_closed_by_kind"][scales[0]])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.6), sharey=True)
    width = 0.8 / len(rows)
    for axis, kind in zip(axes, kinds):
        for i, row in enumerate(rows):
            values = [row["image_gap_closed_by_kind"][w][kind] for w in scales]
            axis.bar(np.arange(len(scales)) + (i - (len(rows) - 1) / 2) * width, values, width, label=row["method"])
        axis.set_xticks(np.arange(len(scales)), [f"w = {w:g}" for w in scales])
        axis.set_title(f"captions with {kind}")
        axis.axhline(1.0, color="gray", linewidth=0.8)
    lowest = min(gaps[kind] for row in rows for gaps in row["image_gap_closed_by_kind"].values() for kind in kinds)
    axes[0].set_ylim(max(0.0, np.floor(lowest * 10 - 1) / 10), 1.02)  # the differences, not the distance from 0
    axes[0].set_ylabel("image gap to CFG closed")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(rows), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
