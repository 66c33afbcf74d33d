"""The transfer curve: how far from its base a fine-tune may move before a guide trained on the base stops carrying to it.

For each fine-tune (LoRA weights or a full fine-tune) at each scale s (LoRA: the adapter's weight, through diffusers'
`set_adapters`; a full fine-tune: its UNet weights interpolated, base + s * (fine-tune - base)), at each w, on the same
prompts and seeds:

- **distance** from the base: MSE(CFG_ft, CFG_base) / MSE(none_base, CFG_base) on the images, where none is w = 1: how
  much of the way from the base's unguided images to its CFG images the fine-tune's CFG images lie, 0 for the base;
- **cosine** per step of the two CFG corrections, cond - uncond of the fine-tune and of the base at the same x_t (the
  fine-tune's CFG trajectory), averaged over images; and the ratio of their norms;
- for each method, the **image gap closed** to the fine-tune's own CFG, 1 - MSE(method, CFG_ft) / MSE(none_ft, CFG_ft),
  **adherence** (the shapes judge, in the model's style, looking for the new shapes it learnt) and **FID** (shapes
  features, against real held-out images of the same prompt group; with tens of images only comparable within a group).

Methods: every guide given, with its own policy as a user gets it (a guide distilled on the first steps also again with
the carry fitted on the fine-tune, "+ ft carry"), and the training-free paths with a CorrectionCarry fitted on the
fine-tune itself: "cfg + carry K" (CFG for K steps, then its correction carried) and "cfg + AG T + carry" (Adaptive
Guidance at threshold T, then the correction carried). A model that learnt a new shape (ModelSpec.concept) is measured on two prompt
groups: the ordinary held-out captions and held-out captions that name the new shape.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..carry import CorrectionCarry
from ..evaluation.gap import gap_closed, image_mse
from ..evaluation.sampling import as_plug_and_play
from ..loading import check_guide_dir, load_guide, load_pipeline
from ..pipeline import Branches
from ..policy import GuidancePolicy
from . import shapes
from .adherence import judge

CARRY_FIT_PROMPTS = 16  # training captions CorrectionCarry.fit samples CFG on (half of them naming the new shape, if any)
FID_REFERENCE_IMAGES = 1000
ANGLE_IMAGES = 16  # images whose CFG corrections are compared with the base's at every step (the cosine varies little between images)
BASE_STYLE = "flat"  # the style the embedded base draws, in which its own CFG images are judged
PROMPT_SEED = 777  # the held-out prompts `pnpguide eval` uses
DEFAULT_GUIDES = ("default", "paper")  # the default guide (first 5 steps, then carried) and the paper's design


@dataclass
class TransferRow:
    model: str
    scale: float  # LoRA weight, or the share of the way from the base to the full fine-tune
    guidance_scale: float
    prompts: str  # "ordinary" or "with <concept>"
    images: int
    distance: float  # MSE(CFG_ft, CFG_base) / MSE(none_base, CFG_base)
    cosine_per_step: list[float]  # cos(d_ft, d_base) per sampling step, d = cond - uncond at the fine-tune's CFG states
    norm_ratio_per_step: list[float]  # |d_ft| / |d_base| per step
    image_gap_closed: dict[str, float | None] = field(default_factory=dict)  # method -> 1 - MSE(m, CFG_ft) / MSE(none_ft, CFG_ft)
    adherence: dict[str, float | None] = field(default_factory=dict)  # method (and "cfg", "none", "base cfg": the base's CFG images, judged in its flat style) -> judge's pass rate
    fid: dict[str, float | None] = field(default_factory=dict)  # method (and "cfg", "none") -> FID against real images of the group

    @property
    def cosine_summary(self) -> tuple[float, float, float]:
        """(first step, mean of steps 2-5, mean of steps 6 on)."""
        c = self.cosine_per_step
        return c[0], float(np.mean(c[1:5])) if len(c) > 1 else float("nan"), float(np.mean(c[5:])) if len(c) > 5 else float("nan")


@dataclass
class _Method:
    name: str
    mode: str  # pipeline mode
    guide: object | None = None
    full_steps: int | None = None  # with the fine-tune's own carry: CFG's (or the guide's) first K steps, then carried (None: the guide's own policy)
    adaptive_threshold: float | None = None  # cfg: Adaptive Guidance, then the fine-tune's own carry

    def policy(self, ft_carry: CorrectionCarry) -> GuidancePolicy | None:
        if self.adaptive_threshold is not None:
            return GuidancePolicy(adaptive_threshold=self.adaptive_threshold, carry=ft_carry)
        return None if self.full_steps is None else GuidancePolicy(carry=ft_carry.with_full_steps(self.full_steps))


def transfer_prompts(count: int, concept: str | None = None) -> dict[str, list[str]]:
    """The held-out prompts of each group: `count` of `pnpguide eval`'s ordinary ones, and with `concept`, as many naming it."""
    groups = {"ordinary": [shapes.sample_scene(i, PROMPT_SEED, "heldout").caption for i in range(count)]}
    if concept is not None:
        groups[f"with {concept}"] = [shapes.sample_concept_scene(i, PROMPT_SEED, "heldout", concept).caption for i in range(count)]
    return groups


def concept_of(spec) -> str | None:
    """The new shape a model learnt (evaluate.ModelSpec.concept), if any."""
    return getattr(spec, "concept", None)


def _fit_prompts(concept: str | None) -> list[str]:
    if concept is None:
        return shapes.split_captions(CARRY_FIT_PROMPTS, split="train", seed=7)
    half = CARRY_FIT_PROMPTS // 2
    return shapes.split_captions(half, split="train", seed=7) + shapes.split_captions(half, split="train", seed=7, concept=concept)


def _guide_methods(guide_dirs: list[str], carry_steps: list[int], thresholds: list[float]) -> list[_Method]:
    methods = []
    for folder in guide_dirs:
        path = check_guide_dir(folder)
        guide = load_guide(path).eval()
        name = f"guide:{path.name}"
        methods.append(_Method(name, "guide", guide))
        first_steps = getattr(guide.config, "trained_first_steps", None)
        if first_steps:
            methods.append(_Method(f"{name} + ft carry", "guide", guide, first_steps))
    methods += [_Method(f"cfg + carry {k}", "cfg", None, k) for k in carry_steps]
    return methods + [_Method(f"cfg + AG {t:g} + carry", "cfg", None, adaptive_threshold=t) for t in thresholds]


class _ScaledFinetune:
    """Puts a fine-tune at scale s: LoRA weights through set_adapters, a full fine-tune by interpolating its UNet's
    weights with the base's."""

    def __init__(self, pipe, base_unet):
        self.pipe = pipe
        self.adapters = pipe.get_list_adapters().get("unet", []) if getattr(pipe.unet, "peft_config", None) else []
        self.base = None if self.adapters else {k: v.detach().clone() for k, v in base_unet.state_dict().items()}
        self.tuned = None if self.adapters else {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
        if self.base is not None and self.base.keys() != self.tuned.keys():
            raise ValueError("the full fine-tune's UNet does not have its base's weights: scales need the same architecture")

    def set(self, scale: float) -> None:
        if self.adapters:
            self.pipe.set_adapters(self.adapters, adapter_weights=[scale] * len(self.adapters))
            return
        self.pipe.unet.load_state_dict({k: self.base[k] + scale * (self.tuned[k] - self.base[k]) if self.base[k].is_floating_point()
                                        else self.tuned[k] for k in self.base})


@torch.no_grad()
def _sample(pipe, prompts: list[str], w: float, steps: int, seed: int, batch_size: int, mode: str, guide=None,
            policy: GuidancePolicy | None = None, observer_factory=None) -> list[Image.Image]:
    """Image i from the generator seeded `seed * 1_000_003 + i`, as `pnpguide eval` seeds it."""
    pipe.guide = guide
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(batch))]
        with pipe.model_output_observer(observer_factory(batch, start) if observer_factory is not None else None):
            images += pipe(batch, guidance_scale=w, num_inference_steps=steps, generator=generators, mode=mode, policy=policy).images
    return images


class _CorrectionAngles:
    """At each state of the fine-tune's CFG run: cos(d_ft, d_base) and |d_ft| / |d_base| per image, summed per step, over
    the first `images` images (the base's two passes there cost two more UNet passes per step and image)."""

    def __init__(self, base, w: float, images: int):
        self.base, self.w, self.images = base, w, images
        self.cosines, self.ratios, self.counts = {}, {}, {}

    def __call__(self, batch: list[str], start: int):
        rows = min(len(batch), self.images - start)
        if rows <= 0:
            return None
        cond_base, empty_base = self.base.encode_prompt(batch[:rows], self.base.device, 1, True)
        step = iter(range(10**9))

        def observe(observed):
            k = next(step)
            model_input = observed.model_input[:rows]
            d_ft = ((observed.output[:rows] - observed.conditional[:rows]) / (self.w - 1)).flatten(1).float()
            _, _, d_base = self.base.model_output("cfg", model_input, observed.timestep, Branches(cond_base, empty_base), self.w)
            d_base = d_base.flatten(1).float()
            self.cosines[k] = self.cosines.get(k, 0.0) + torch.nn.functional.cosine_similarity(d_ft, d_base, dim=1).sum().item()
            self.ratios[k] = self.ratios.get(k, 0.0) + (d_ft.norm(dim=1) / d_base.norm(dim=1).clamp_min(1e-12)).sum().item()
            self.counts[k] = self.counts.get(k, 0) + len(d_ft)
        return observe

    def per_step(self) -> tuple[list[float], list[float]]:
        steps = sorted(self.counts)
        return [self.cosines[k] / self.counts[k] for k in steps], [self.ratios[k] / self.counts[k] for k in steps]


class _Fid:
    """FID with the shipped shapes feature network, against real held-out images of one style and prompt group."""

    def __init__(self):
        from ..evaluation.fid import make_fid_scorer

        self.scorer = make_fid_scorer("shapes")
        self.key = None

    def reference(self, style: str, concept: str | None) -> None:
        key = (style, concept)
        if key == self.key:
            return
        from ..evaluation.fid import to_tensor

        metric = self.scorer.metric
        metric.reset_real_features = True
        metric.reset()
        metric.reset_real_features = False
        scenes = [shapes.sample_scene(i, 31337, "heldout") if concept is None else shapes.sample_concept_scene(i, 31337, "heldout", concept)
                  for i in range(FID_REFERENCE_IMAGES)]
        images = [shapes.render(scene, style, noise_seed=i) for i, scene in enumerate(scenes)]
        for start in range(0, len(images), 256):
            metric.update(to_tensor(images[start:start + 256]), real=True)
        self.key = key

    def __call__(self, images: list[Image.Image]) -> float:
        return self.scorer.score(images)


def _adherence(images, prompts, style: str, new_shapes: tuple[str, ...]) -> float:
    return float(np.mean([judge(image, prompt, style, new_shapes).ok for image, prompt in zip(images, prompts)]))


def transfer_curve(finetunes: list, scales: list[float], guidance_scales: list[float], guides: list[str], carry_steps: list[int],
                   images: int, steps: int = 25, seed: int = 0, base: str | None = None, batch_size: int = 48, fid: bool = True,
                   device: str = "cpu", angle_images: int = ANGLE_IMAGES, log=print, thresholds: list[float] = ()) -> tuple[list[TransferRow], str]:
    """Rows of the transfer curve for `finetunes` (evaluate.ModelSpec) at each LoRA scale, and a markdown table.
    `base`: the folder the guides were trained on (default: a LoRA's own base, otherwise the embedded model);
    `angle_images`: the cosines are measured on the first this many images of each prompt group."""
    scorer = _Fid() if fid else None
    methods = _guide_methods(guides, carry_steps, list(thresholds))
    for method in methods:
        if method.guide is not None:
            method.guide.to(device)
    rows = []
    references: dict = {}  # (base folder, group, w) -> CFG_base images; (base folder, group) -> none_base images
    for spec in finetunes:
        base_dir = base if base is not None else (spec.base if spec.lora else None)
        base_pipe = as_plug_and_play(load_pipeline(base_dir, device=device))
        pipe = as_plug_and_play(load_pipeline(spec.base, spec.lora, device=device))
        for m in methods:
            if m.guide is not None:
                m.guide.check_compatible(pipe.unet)
        scaled = _ScaledFinetune(pipe, base_pipe.unet)
        resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
        fid_here = scorer if scorer is not None and scorer.scorer.image_size in (None, resolution) else None  # the shapes features take 64 px
        groups = transfer_prompts(images, concept_of(spec))
        new_shapes = (concept_of(spec),) if concept_of(spec) else ()
        for group, prompts in groups.items():
            for w in guidance_scales:
                if (base_dir, group, w) not in references:
                    references[(base_dir, group, w)] = _sample(base_pipe, prompts, w, steps, seed, batch_size, "cfg")
            if (base_dir, group) not in references:
                references[(base_dir, group)] = _sample(base_pipe, prompts, 1.0, steps, seed, batch_size, "none")
        for scale in scales:
            scaled.set(scale)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an output guide with LoRA weights warns: measuring that is the point
                # the factors do not depend on how many steps run in full: one fit on the fine-tune serves every K
                ft_carry = CorrectionCarry.fit(pipe, _fit_prompts(concept_of(spec)), full_steps=1, num_inference_steps=steps)
                for group, prompts in groups.items():
                    if fid_here is not None:
                        fid_here.reference(spec.style, concept_of(spec) if group != "ordinary" else None)
                    none_ft = _sample(pipe, prompts, 1.0, steps, seed, batch_size, "none")
                    none_base = references[(base_dir, group)]
                    for w in guidance_scales:
                        cfg_base = references[(base_dir, group, w)]
                        angles = _CorrectionAngles(base_pipe, w, angle_images)
                        cfg_ft = _sample(pipe, prompts, w, steps, seed, batch_size, "cfg", observer_factory=angles)
                        cosines, ratios = angles.per_step()
                        row = TransferRow(spec.name, scale, w, group, len(prompts), image_mse(cfg_ft, cfg_base) / image_mse(none_base, cfg_base),
                                          cosines, ratios)
                        sampled = {"cfg": cfg_ft, "none": none_ft}
                        for m in methods:
                            sampled[m.name] = _sample(pipe, prompts, w, steps, seed, batch_size, m.mode, m.guide, m.policy(ft_carry))
                        unguided = image_mse(none_ft, cfg_ft)
                        for name, result in sampled.items():
                            if name not in ("cfg", "none"):
                                row.image_gap_closed[name] = gap_closed(image_mse(result, cfg_ft), unguided)
                            row.adherence[name] = _adherence(result, prompts, spec.style, new_shapes)
                            row.fid[name] = fid_here(result) if fid_here is not None else None
                        row.adherence["base cfg"] = _adherence(cfg_base, prompts, BASE_STYLE, ())  # the base draws flat shapes
                        rows.append(row)
                        log(f"{spec.name} scale {scale:g} w {w:g} {group}: distance {row.distance:.3f}, cosine "
                            f"{' / '.join(f'{c:.2f}' for c in row.cosine_summary)}, gap closed "
                            + ", ".join(f"{k} {v:.3f}" for k, v in row.image_gap_closed.items() if v is not None))
    return rows, markdown(rows)


def markdown(rows: list[TransferRow]) -> str:
    """One line per (model, scale, w, prompt group); a second table with the per-step cosines."""
    methods = list(dict.fromkeys(name for row in rows for name in row.image_gap_closed))
    fmt = lambda v: "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.2f}"  # noqa: E731
    lines = [
        "| model | scale | w | prompts | distance | cos(d_ft, d_base) step 1 / 2-5 / 6+ | image gap closed: " + " / ".join(methods)
        + " | adherence: base CFG / CFG / none / " + " / ".join(methods) + " | FID: CFG / none / " + " / ".join(methods) + " |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cos = " / ".join(fmt(c) for c in r.cosine_summary)
        gaps = " / ".join(fmt(r.image_gap_closed.get(m)) for m in methods)
        adherence = " / ".join(fmt(r.adherence.get(k)) for k in ["base cfg", "cfg", "none", *methods])
        fid = " / ".join("–" if r.fid.get(k) is None else f"{r.fid[k]:.1f}" for k in ["cfg", "none", *methods])
        lines.append(f"| {r.model} | {r.scale:g} | {r.guidance_scale:g} | {r.prompts} | {r.distance:.3f} | {cos} | {gaps} | {adherence} | {fid} |")
    lines += ["", "Cosine of the fine-tune's CFG correction with the base's at the same state, per step (and norm ratio |d_ft| / |d_base|):", "",
              "| model | scale | w | prompts | cosine per step | norm ratio per step |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.scale:g} | {r.guidance_scale:g} | {r.prompts} | {' '.join(f'{c:.2f}' for c in r.cosine_per_step)} | "
                     f"{' '.join(f'{c:.2f}' for c in r.norm_ratio_per_step)} |")
    return "\n".join(lines) + "\n"


def run_transfer(config) -> dict:
    """`pnpguide eval --transfer`: the curve for every --base model at every --lora-scales scale, each --scales w, at
    the one --steps count, --images prompts per group, the first --seeds seed; --guide (default: default and paper),
    --correction-carry K (default: 5) and --adaptive-thresholds T for the training-free paths. Writes report.json and report.md to out_dir."""
    import json

    from ..evaluation.evaluate import parse_model_spec

    if len(config.steps) != 1:
        raise ValueError(f"--transfer samples at one step count (pass e.g. --steps 25), got {config.steps}")
    specs = [parse_model_spec(m) for m in config.base]  # bad specs fail before anything slow
    guides = config.guide or list(DEFAULT_GUIDES)
    rows, table = transfer_curve(specs, config.lora_scales, config.scales, guides, config.correction_carry or [5], config.images,
                                 config.steps[0], config.seeds[0], config.transfer_base, config.batch_size, config.fid_features != "none",
                                 config.device, thresholds=config.adaptive_thresholds)
    result = {"kind": "transfer", "config": dataclasses.asdict(config),
              "rows": [dataclasses.asdict(row) | {"cosine_summary": list(row.cosine_summary)} for row in rows]}
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(f"# Transfer curve ({config.steps[0]} steps, {config.images} prompts per group, seed {config.seeds[0]})\n\n"
                                   f"![image gap closed against distance](curve.png)\n\n{table}")
    write_curve_plots(rows, out)
    return result


def write_curve_plots(rows: list[TransferRow], out: Path) -> None:
    """curve.png (one w: the first) and curve-w{w}.png for each other w: every method's image gap against distance."""
    from ..pipeline import REACH
    from ..evaluation.plots import transfer_curve_plot

    for i, w in enumerate(dict.fromkeys(row.guidance_scale for row in rows)):
        points: dict[str, list[tuple[float, float]]] = {}
        for row in (r for r in rows if r.guidance_scale == w):
            for method, gap in row.image_gap_closed.items():
                if gap is not None and row.distance > 0:
                    points.setdefault(method, []).append((row.distance, gap))
        name = "curve.png" if i == 0 else f"curve-w{w:g}.png"
        transfer_curve_plot(points, out / name, REACH, f"how far a guide distilled on the base carries, w = {w:g}")
