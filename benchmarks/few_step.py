"""Few-step sampling with a grid-distilled guide, against CFG at many steps, through the pipeline's public call.

Each guide samples on the grid it was distilled on (`trained_timesteps`; a uniformly step-distilled guide on DDIM's
grid at its `trained_step_counts`) with `GridDDIMScheduler` and `pipe(prompts, timesteps=grid, ...)`, with its
`default_guidance_interval` (the pipeline's own default: none with a negative prompt). The captions, per-image noise
(image i of seed s: generator seeded s * 1_000_003 + i), FID features and adherence judge are those of `pnpguide eval`;
the reference rows (CFG and no guidance at --ref-steps, uniform DDIM) are cached on disk, per w and seed.

Rows per w and seed:
  cfg@REF, none@REF                  the references (image gap closed = 1 - MSE(row, cfg@REF) / MSE(none@REF, cfg@REF))
  NAME                                the guide on its grid: one UNet call per timestep
  cfg on NAME's grid, none on ...    (--grid-baselines) CFG (two passes a step) and the plain UNet on the same grid
  NAME @ uniform S                    (--uniform NAME=GUIDE:S) a guide on DDIM's uniform grid at S steps
  cfg@REF to T + NAME                 (--cfg-to NAME) REF-step CFG down to the guide's timestep T, then the guide's own steps
                                      from T on (`cfg_first_steps`): which of its segments lose the image, as in
                                      docs/results/stage2-late-steps/hybrid.py
With --negative-prompts caption-attributes every row but none@REF samples with one negative per caption (the image gap is
then against CFG@REF with the same negatives), CFG also runs at the guide's step count on DDIM's uniform grid, and
`avoids_negative` is the share of images without what their negative names.

Usage (see docs/results/few-step/command.txt):
  python benchmarks/few_step.py --guides g8=DIR [--images 300] [--seeds 0 1 2] [--scales 7.5] --out OUT.json
  python benchmarks/few_step.py --smoke --out /tmp/few-step-smoke.json      # a handful of images, the shipped guides, < 1 min
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FIXED_SEED_STRIDE = 1_000_003  # pnpguide eval: image i of seed s is drawn from the generator seeded s * stride + i


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--guides", nargs="*", default=[], metavar="NAME=GUIDE", help="guide folders (or shipped names) to sample on their grids")
    p.add_argument("--uniform", nargs="*", default=[], metavar="NAME=GUIDE:STEPS", help="guides on DDIM's uniform grid at STEPS")
    p.add_argument("--cfg-to", nargs="*", default=[], metavar="NAME", help="for these guides, REF-step CFG down to each of their timesteps, then the guide")
    p.add_argument("--tails", nargs="*", default=[], metavar="T1,T2,...", help="REF-step CFG down to T1, then the plain UNet at T1, T2, ... (where a grid can stop guiding)")
    p.add_argument("--grid-baselines", action="store_true", help="also CFG and no guidance on each guide's grid")
    p.add_argument("--negative-prompts", default=None, help="caption-attributes (or a file): sample with one negative per caption")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--scales", type=float, nargs="+", default=[7.5])
    p.add_argument("--ref-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--base", default=None, help="base folder (default: the embedded model)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "pnpguide-few-step"), help="where the reference rows' images are kept")
    p.add_argument("--grid-png", default=None, help="write one grid image: the first 8 captions, first seed, largest w")
    p.add_argument("--smoke", action="store_true", help="8 images, 10 reference steps, seed 0, the shipped output-8step: checks the script runs")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.seeds, args.ref_steps = 8, [0], 10
        args.guides = args.guides or ["output-8step=output-8step"]
        args.cfg_to = args.cfg_to or [args.guides[0].split("=")[0]]
        args.grid_baselines = True
    return args


def named(specs: list[str]) -> dict[str, str]:
    pairs = [spec.split("=", 1) if "=" in spec else (Path(spec).name, spec) for spec in specs]
    return dict(pairs)


def guide_grid(guide, scheduler_config) -> list[int]:
    """The timesteps a guide samples at: its trained grid, or DDIM's uniform grid at its (first) step count."""
    if getattr(guide.config, "trained_timesteps", None):
        return [int(t) for t in guide.config.trained_timesteps]
    counts = guide.config.trained_step_counts
    if not counts:
        raise ValueError("this guide records neither trained_timesteps nor trained_step_counts: give it with --uniform NAME=GUIDE:STEPS")
    return uniform_grid(scheduler_config, counts[0])


def uniform_grid(scheduler_config, steps: int) -> list[int]:
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(steps)
    return ddim.timesteps.tolist()


class Sampler:
    """The pipeline, one scheduler swapped in, and the prompts, noise and (optional) negatives of every row."""

    def __init__(self, pipe, prompts: list[str], negatives: list[str] | None, batch_size: int):
        from pnpguide.evaluation.speed import UNetCallCounter
        from pnpguide.schedulers import GridDDIMScheduler

        self.pipe, self.prompts, self.negatives, self.batch_size = pipe, prompts, negatives, batch_size
        self.schedule_config = dict(pipe.scheduler.config)
        pipe.scheduler = GridDDIMScheduler.from_config(self.schedule_config)
        self.unet_counter = UNetCallCounter(pipe.unet)

    @torch.no_grad()
    def __call__(self, timesteps: list[int], w: float, seed: int, guide=None, mode: str | None = None, cfg_first_steps: int = 0,
                 negative: bool = True, guidance_scale: list[float] | None = None) -> tuple[list[Image.Image], float, float]:
        """Images, and the UNet and guide calls per image (a CFG step counts two UNet calls); `guidance_scale`: one w per
        step instead of `w` at every step."""
        from pnpguide.evaluation.speed import UNetCallCounter

        self.pipe.guide = guide
        guide_counter = UNetCallCounter(guide) if guide is not None else None
        self.unet_counter.images, images = 0, []
        try:
            for start in range(0, len(self.prompts), self.batch_size):
                batch = self.prompts[start : start + self.batch_size]
                generators = [torch.Generator().manual_seed(seed * FIXED_SEED_STRIDE + start + i) for i in range(len(batch))]
                negative_prompt = self.negatives[start : start + len(batch)] if self.negatives is not None and negative else None
                images += self.pipe(batch, num_inference_steps=len(timesteps), timesteps=timesteps, guidance_scale=guidance_scale or w, generator=generators, mode=mode, cfg_first_steps=cfg_first_steps,
                                    negative_prompt=negative_prompt).images
        finally:
            if guide_counter is not None:
                guide_counter.close()
        n = len(self.prompts)
        return images, self.unet_counter.images / n, (guide_counter.images / n if guide_counter is not None else 0.0)


def cached(cache: Path, key: str, make) -> tuple[list[Image.Image], float, float]:
    path = cache / f"{key}.npz"
    if path.is_file():
        stored = np.load(path)
        return [Image.fromarray(a) for a in stored["images"]], float(stored["unet"]), float(stored["guide"])
    images, unet_calls, guide_calls = make()
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial.npz")
    np.savez_compressed(partial, images=np.stack([np.asarray(im) for im in images]), unet=unet_calls, guide=guide_calls)
    partial.replace(path)
    return images, unet_calls, guide_calls


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from pnpguide.evaluation.evaluate import EvalConfig, _adherence_split, eval_prompts
    from pnpguide.evaluation.fid import make_fid_scorer
    from pnpguide.evaluation.gap import gap_closed, image_mse
    from pnpguide.evaluation.negative_prompts import avoidance_rate, eval_negatives
    from pnpguide.evaluation.sampling import as_plug_and_play, image_grid
    from pnpguide.loading import load_guide, load_pipeline

    started = time.time()
    prompts = eval_prompts(EvalConfig(images=args.images))
    negatives = eval_negatives(args.negative_prompts, prompts)
    pipe = as_plug_and_play(load_pipeline(args.base))
    pipe.set_progress_bar_config(disable=True)
    sampler = Sampler(pipe, prompts, negatives, args.batch_size)
    scorer = make_fid_scorer("shapes")
    scorer.set_reference("flat", len(prompts), image_size=pipe.unet.config.sample_size * pipe.vae_scale_factor)
    guides = {name: load_guide(spec).eval() for name, spec in named(args.guides).items()}
    uniform = {name: (load_guide(spec.rsplit(":", 1)[0]).eval(), int(spec.rsplit(":", 1)[1])) for name, spec in named(args.uniform).items()}
    ref_grid = uniform_grid(sampler.schedule_config, args.ref_steps)
    neg_key = "" if negatives is None else f"-neg-{args.negative_prompts}".replace("/", "_")
    cache = Path(args.cache) / f"base-{Path(args.base).name if args.base else 'embedded'}"

    def plan(w: float) -> list[tuple[str, dict]]:
        """(row name, sampler arguments) for one w, the references first."""
        rows = [(f"cfg@{args.ref_steps}", dict(timesteps=ref_grid, mode="cfg")), (f"none@{args.ref_steps}", dict(timesteps=ref_grid, mode="none", negative=False))]
        for name, guide in guides.items():
            grid = guide_grid(guide, sampler.schedule_config)
            rows.append((name, dict(timesteps=grid, guide=guide, mode="guide")))
            if negatives is not None:
                rows.append((f"{name} (no neg)", dict(timesteps=grid, guide=guide, mode="guide", negative=False)))
            if args.grid_baselines:
                rows.append((f"cfg on {name}'s grid", dict(timesteps=grid, mode="cfg")))
                rows.append((f"none on {name}'s grid", dict(timesteps=grid, mode="none", negative=False)))
            if negatives is not None:
                rows.append((f"cfg@{len(grid)} uniform", dict(timesteps=uniform_grid(sampler.schedule_config, len(grid)), mode="cfg")))
            if name in args.cfg_to:
                low = (getattr(guide.config, "default_guidance_interval", None) or (0, 0))[0]
                for k, t in enumerate(grid[1:], start=1):
                    if grid[k - 1] < low:  # CFG keeps the guide's interval: below it the rows would be the same
                        break
                    before = [s for s in ref_grid if s > t]
                    rows.append((f"cfg@{args.ref_steps} to {t} + {name} ({len(grid) - k} steps)",
                                 dict(timesteps=before + grid[k:], guide=guide, mode="guide", cfg_first_steps=len(before))))
        for tail in args.tails:
            plain = [int(t) for t in tail.split(",")]
            before = [s for s in ref_grid if s > plain[0]]
            rows.append((f"cfg@{args.ref_steps} to {plain[0]} + plain at {tail}",
                         dict(timesteps=before + plain, mode="cfg", guidance_scale=[w] * len(before) + [1.0] * len(plain))))
        for name, (guide, steps) in uniform.items():
            rows.append((f"{name} @ uniform {steps}", dict(timesteps=uniform_grid(sampler.schedule_config, steps), guide=guide, mode="guide")))
        return rows

    results, grid_rows = [], {}
    for w in args.scales:
        for seed in args.seeds:
            sampled = {}
            for name, kwargs in plan(w):
                is_reference = name in (f"cfg@{args.ref_steps}", f"none@{args.ref_steps}")
                make = lambda kwargs=kwargs: sampler(w=1.0 if kwargs["mode"] == "none" else w, seed=seed, **kwargs)  # noqa: E731
                if is_reference:
                    unguided = name.startswith("none")  # no guidance is the same at every w, and takes no negative
                    key = f"{name.replace('@', '')}{'' if unguided else f'-w{w}'}-seed{seed}-n{args.images}{'' if unguided else neg_key}"
                    images, unet_calls, guide_calls = cached(cache, key, make)
                else:
                    images, unet_calls, guide_calls = make()
                sampled[name] = images
                adherence = _adherence_split(images, prompts, "flat")
                row = {"row": name, "w": w, "seed": seed, "timesteps": kwargs["timesteps"], "cfg_first_steps": kwargs.get("cfg_first_steps", 0),
                       "negative_prompt": negatives is not None and kwargs.get("negative", True) and kwargs["mode"] != "none",
                       "unet_calls_per_image": unet_calls, "guide_calls_per_image": guide_calls, "fid": scorer.score(images),
                       "adherence": adherence[0], "adherence_1_2": list(adherence[1:])}
                if negatives is not None:
                    row["avoids_negative"] = avoidance_rate(images, negatives, "flat")
                if not is_reference:
                    reference, unguided = sampled[f"cfg@{args.ref_steps}"], sampled[f"none@{args.ref_steps}"]
                    row["image_gap_vs_cfg_ref"] = gap_closed(image_mse(images, reference), image_mse(unguided, reference))
                results.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "timesteps"}), flush=True)
                if seed == args.seeds[0] and w == max(args.scales):
                    grid_rows[name] = images[:8]
    summary = summarise(results, args.ref_steps)
    print_table(summary)
    output = {"images": args.images, "seeds": args.seeds, "scales": args.scales, "ref_steps": args.ref_steps,
              "negative_prompts": args.negative_prompts, "guides": {**named(args.guides), **named(args.uniform)},
              "seconds": round(time.time() - started, 1), "summary": summary, "rows": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(output, indent=1))
    if args.grid_png:
        names = [n for n in grid_rows if not n.startswith("cfg@") or n == f"cfg@{args.ref_steps}"]
        image_grid([grid_rows[n] for n in names]).save(args.grid_png)
        Path(args.grid_png).with_suffix(".txt").write_text("rows, top to bottom: " + "; ".join(names) + "\n")
    return output


def summarise(results: list[dict], ref_steps: int) -> list[dict]:
    """Per row and w, over its seeds: means, and the ratios of the means to CFG@REF's (as docs/guides.md reports them)."""
    reference = f"cfg@{ref_steps}"
    summary = []
    for (name, w) in dict.fromkeys((r["row"], r["w"]) for r in results):
        rows = [r for r in results if r["row"] == name and r["w"] == w]
        refs = [r for r in results if r["row"] == reference and r["w"] == w]
        mean = lambda key, rows=rows: float(np.mean([r[key] for r in rows])) if all(r.get(key) is not None for r in rows) else None  # noqa: E731
        fid, adherence = mean("fid"), mean("adherence")
        entry = {"row": name, "w": w, "seeds": [r["seed"] for r in rows], "unet_calls_per_image": rows[0]["unet_calls_per_image"],
                 "guide_calls_per_image": rows[0]["guide_calls_per_image"], "fid": fid, "adherence": adherence,
                 "fid_ratio": fid / float(np.mean([r["fid"] for r in refs])), "adherence_ratio": adherence / float(np.mean([r["adherence"] for r in refs])),
                 "image_gap_vs_cfg_ref": mean("image_gap_vs_cfg_ref"), "image_gap_per_seed": [r.get("image_gap_vs_cfg_ref") for r in rows],
                 "fid_per_seed": [r["fid"] for r in rows], "adherence_per_seed": [r["adherence"] for r in rows]}
        if rows[0].get("avoids_negative") is not None:
            entry["avoids_negative"] = mean("avoids_negative")
        summary.append(entry)
    return summary


def print_table(summary: list[dict]) -> None:
    head = f"{'row':58} {'w':>4} {'seeds':>7} {'UNet':>5} {'guide':>5} {'FID':>7} {'FID x':>6} {'adh':>6} {'adh x':>6} {'gap':>6} {'avoid':>6}"
    print(head + "\n" + "-" * len(head))
    for e in summary:
        gap = "" if e["image_gap_vs_cfg_ref"] is None else f"{e['image_gap_vs_cfg_ref']:.3f}"
        avoid = "" if e.get("avoids_negative") is None else f"{e['avoids_negative']:.3f}"
        print(f"{e['row'][:58]:58} {e['w']:>4} {','.join(map(str, e['seeds'])):>7} {e['unet_calls_per_image']:>5.0f} {e['guide_calls_per_image']:>5.0f} "
              f"{e['fid']:>7.2f} {e['fid_ratio']:>6.3f} {e['adherence']:>6.3f} {e['adherence_ratio']:>6.3f} {gap:>6} {avoid:>6}")


if __name__ == "__main__":
    main(sys.argv[1:])
