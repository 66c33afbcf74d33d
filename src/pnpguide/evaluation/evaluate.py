"""`pnpguide eval`: every method on every model, from the same seeds: FID, adherence, fidelity, compute, speed.

Methods: `none` (w = 1), `cfg` (the teacher, batched cond+uncond as diffusers does) and `guide:<name>`
for each guide given; a step-distilled guide only runs at the step counts it was distilled for. Each
(model, method, steps, w) row holds the mean over seeds, and FID per seed so its spread is visible.
With `negative_prompts`, cfg and the guides sample with each prompt's negative (guides also without it), and
every row is compared with CFG with that negative (negative_prompts.py).
"""

from __future__ import annotations

import dataclasses
import platform
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..conditioning import encode_negative, encode_negatives
from ..devices import resolve_device, resolve_dtype
from ..loading import ASSETS_DIR, check_guide_fits_base, default_base_dir, load_guide, load_pipeline, shipped_guide_dirs
from ..sources import read_prompt_file
from .fid import FidScorer, make_fid_scorer
from .gap import StepGap, gap_closed, image_mse, step_gaps
from .methods import ADAPTIVE, ADAPTIVE_CARRY, CARRY, NO_NEGATIVE, Method, sample
from .negative_prompts import avoidance_rate, eval_negatives, measurable
from .sampling import as_plug_and_play, mean_psnr
from .speed import median_seconds, parameter_count, peak_memory_bytes, step_cost
from .teacher_states import TeacherTrajectory

METHODS = ("none", "cfg", "guide")


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: an SD folder (None: embedded), optional LoRA weights, the style it draws, and the new shape
    it learnt (shapes.NEW_SHAPES), which the judge then looks for in its images."""

    name: str
    base: str | None = None
    lora: str | None = None
    style: str = "flat"
    concept: str | None = None

    @property
    def new_shapes(self) -> tuple[str, ...]:
        return (self.concept,) if self.concept else ()


SHIPPED_MODELS = {
    "embedded": ModelSpec("embedded"),
    "pastel-full": ModelSpec("pastel-full", str(ASSETS_DIR / "finetunes" / "pastel-full"), None, "pastel"),
    "outline-lora": ModelSpec("outline-lora", None, str(ASSETS_DIR / "finetunes" / "outline-lora"), "outline"),
    "bar-lora": ModelSpec("bar-lora", None, str(ASSETS_DIR / "finetunes" / "bar-lora"), "flat", "bar"),
}


def parse_model_spec(text: str) -> ModelSpec:
    """`embedded`, `pastel-full`, `outline-lora`, `bar-lora` (shipped), or `PATH[,lora=PATH][,style=STYLE][,name=NAME][,concept=SHAPE]`."""
    if text in SHIPPED_MODELS:
        return SHIPPED_MODELS[text]
    path, *options = text.split(",")
    values = {"name": Path(path).name, "base": path, "lora": None, "style": "flat"}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in ("lora", "style", "name", "concept"):
            raise ValueError(f"bad model option {option!r} in {text!r}; write PATH[,lora=PATH][,style=STYLE][,name=NAME][,concept=SHAPE]")
        values[key] = value
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model folder {path!r} does not exist (shipped models: {', '.join(SHIPPED_MODELS)})")
    if any(option.startswith(("style=", "concept=")) for option in options):  # the shapes world's styles and shapes
        from ..embedded import shapes

        shapes.check_style(values["style"])
        if "concept" in values:
            shapes.check_concept(values["concept"])
    return ModelSpec(**values)


@dataclass
class EvalConfig:
    base: list[str] = field(default_factory=lambda: ["embedded"])  # models: embedded, pastel-full, outline-lora or PATH[,lora=PATH][,style=STYLE][,name=NAME]
    guide: list[str] | None = None  # guide folders (default: every guide shipped for the embedded model)
    methods: list[str] = field(default_factory=lambda: list(METHODS))  # any of none, cfg, guide
    steps: list[int] = field(default_factory=lambda: [8, 16, 25, 50])  # sampling step counts (step-distilled guides: their own)
    cfg_steps: list[int] = field(default_factory=list)  # extra step counts for the cfg teacher only (e.g. 50: the reference for step-distilled guides)
    scales: list[float] = field(default_factory=lambda: [3.0, 5.0, 7.5])  # guidance scales w (diffusers' convention)
    correction_carry: list[int] = field(default_factory=list)  # K ...: with cfg, also a row "cfg + carry K" per K: CFG's two passes for the first K steps, then one pass per step with CFG's last correction carried on (pnpguide.CorrectionCarry, fitted on 16 of the prompts) (default: none)
    adaptive_thresholds: list[float] = field(default_factory=list)  # T ...: with cfg, also a row "cfg + AG T" per T: Adaptive Guidance (CFG per image until cos(cond, uncond) >= T, then the conditional pass), and with --correction-carry a row "cfg + AG T + carry" (its correction carried after) (default: none)
    images: int = 500  # images per (model, method, steps, w) and seed
    seeds: list[int] = field(default_factory=lambda: [0])  # one run per seed; FID is reported with its spread
    prompts: str | None = None  # text/JSONL prompt file (default: held-out captions of the shapes data)
    negative_prompts: str | None = None  # negative prompt file (one per line, cycled over the prompts) or caption-attributes (each shapes caption's first object: colour, shape, coloured shape in turns); cfg and guides sample with them, guides also without (default: none)
    fid_features: str = "shapes"  # "shapes" (shipped network), "inception" (needs --inception-weights) or "none"
    inception_weights: str | None = None  # local FID Inception weights file, for --fid-features inception
    reference: str | None = None  # folder of real images for FID (default: held-out shapes images of the model's style)
    batch_size: int = 64  # images per sampling call
    speed: bool = True  # time batch 1 and batch 8 (on the first model)
    grid_prompts: int = 6  # prompts (columns) in each grid; 0 writes no grid
    device: str = "auto"  # cpu, cuda, cuda:N, mps; auto: cuda when available, else cpu
    dtype: str = "float32"  # float32, float16 or bfloat16: base and guides are loaded in it
    out_dir: str = "pnpguide-eval"  # where report.json, report.md, plots and grids go
    transfer: bool = False  # instead: the transfer curve of each --base fine-tune (embedded/transfer.py): distance from the base, cosine of the CFG corrections, image gap closed by the guides and the training-free carry
    lora_scales: list[float] = field(default_factory=lambda: [1.0])  # with --transfer: LoRA weights (a full fine-tune: share of the way from the base)
    transfer_base: str | None = None  # with --transfer: the base the guides were trained on (default: a LoRA's own base, else the embedded model)

    def __post_init__(self):
        self.device = str(resolve_device(self.device))  # "auto" resolved, so the report names the device used
        resolve_dtype(self.dtype, self.device)  # a dtype this device cannot run fails here, before anything loads
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        if self.grid_prompts < 0:
            raise ValueError(f"grid_prompts must be >= 0 (0: no grid), got {self.grid_prompts}")
        if self.images < 2:
            raise ValueError(f"images must be >= 2 (FID needs a covariance), got {self.images}")
        if any(s < 1 for s in self.steps + self.cfg_steps) or not self.steps:
            raise ValueError(f"steps must be positive integers, got {self.steps}")
        if any(k < 1 or k > min(self.steps) for k in self.correction_carry):
            raise ValueError(f"correction_carry must be between 1 and the fewest --steps ({min(self.steps)}), got {self.correction_carry}")
        if any(not w >= 1 for w in self.scales) or not self.scales:
            raise ValueError(f"guidance scales must be >= 1 (diffusers' convention), got {self.scales}")
        if any(not -1 < t <= 1 for t in self.adaptive_thresholds):
            raise ValueError(f"adaptive_thresholds are cosines in (-1, 1], got {self.adaptive_thresholds}")
        if self.negative_prompts is not None:
            eval_negatives(self.negative_prompts, eval_prompts(self))  # a missing or empty file fails here, before anything loads


def build_methods(config: EvalConfig) -> list[Method]:
    """With negative prompts, cfg and every guide sample with them, and every guide also without (`NO_NEGATIVE`):
    what a guide that ignores negatives gives. `none` (w = 1) never uses them."""
    negatives = config.negative_prompts is not None
    methods = [Method("none", "none")] if "none" in config.methods else []
    methods += [Method("cfg", "cfg", negative_prompt=negatives)] if "cfg" in config.methods else []
    if "cfg" in config.methods:
        methods += [Method(CARRY.format(k), "cfg", negative_prompt=negatives, carry_full_steps=k) for k in config.correction_carry]
        methods += [Method(ADAPTIVE.format(t), "cfg", negative_prompt=negatives, adaptive_threshold=t) for t in config.adaptive_thresholds]
        methods += [Method(ADAPTIVE_CARRY.format(t), "cfg", negative_prompt=negatives, adaptive_threshold=t, adaptive_carry=True)
                    for t in config.adaptive_thresholds if config.correction_carry]
    if "guide" in config.methods:
        folders = [Path(f) for f in config.guide or shipped_guide_dirs()]
        for folder, name in zip(folders, _distinct_names(folders)):
            guide = load_guide(folder).eval().to(config.device, resolve_dtype(config.dtype, config.device))
            grid = guide.policy.timesteps
            counts = (len(grid),) if grid is not None else None
            methods.append(Method(f"guide:{name}", "guide", guide, counts, negatives))
            if negatives and guide.reads_negative_prompt:
                methods.append(Method(f"guide:{name}{NO_NEGATIVE}", "guide", guide, counts))
    return methods


def _distinct_names(folders: list[Path]) -> list[str]:
    """Folder names, with the parent folder prepended where two guides share a name (runs/a/guide, runs/b/guide)."""
    names = [f.name for f in folders]
    return [f"{f.parent.name}/{f.name}" if names.count(f.name) > 1 else f.name for f in folders]


def eval_prompts(config: EvalConfig) -> list[str]:
    """The held-out caption distribution (one and two objects, as in the data), or the prompt file cycled to N."""
    if config.prompts is not None:
        prompts = read_prompt_file(config.prompts)
        return [prompts[i % len(prompts)] for i in range(config.images)]
    from ..embedded import shapes

    return [shapes.sample_scene(i, seed=777, split="heldout").caption for i in range(config.images)]


def _judgeable(prompts: list[str]) -> bool:
    """Whether the shapes judge can read every prompt (the embedded world's captions)."""
    from ..embedded.adherence import parse_caption

    try:
        for prompt in set(prompts):
            parse_caption(prompt)
    except ValueError:
        return False
    return True


@dataclass
class Row:
    model: str
    method: str
    steps: int
    guidance_scale: float
    images: int
    negative_prompt: bool = False  # sampled with the evaluation's negative prompts (the gaps are always against CFG with them)
    fid: float | None = None  # mean over seeds
    fid_per_seed: list[float] = field(default_factory=list)
    adherence: float | None = None
    adherence_one_object: float | None = None
    adherence_two_objects: float | None = None
    avoids_negative: float | None = None  # share of images not showing what their negative prompt names (measurable ones only)
    psnr_vs_cfg_db: float | None = None  # final images vs the teacher's at the same steps, w and seeds
    mse_vs_cfg: float | None = None  # on [0, 1] pixels
    output_mse_vs_cfg: float | None = None  # per-step model-output MSE vs the teacher on the method's trajectory
    image_gap_closed: float | None = None  # 1 - MSE(images, CFG's) / MSE(no guidance's, CFG's), pooled (gap.py)
    reference_image_gap_closed: float | None = None  # the same against CFG and no guidance at the most steps run (rows with fewer)
    step_gap_closed: float | None = None  # the same for model outputs at the CFG teacher's own states, all steps pooled
    step_gap_closed_per_timestep: list[StepGap] = field(default_factory=list)  # in sampling order
    step_gap_images: int = 0  # images (per seed) whose teacher states were replayed: the first FIDELITY_SUBSET
    unet_evals_per_image: float = 0.0
    guide_evals_per_image: float = 0.0
    gflops_per_image: float = 0.0  # UNet + guide (text encoder and VAE excluded), attention counted
    parameters: int = 0  # UNet + guide
    seconds_per_image_b1: float | None = None
    seconds_per_image_b8: float | None = None
    peak_memory_mb_b8: float | None = None


def _adherence_split(images, prompts, style, new_shapes: tuple[str, ...] = ()) -> tuple[float, float | None, float | None]:
    from ..embedded.adherence import judge, parse_caption

    verdicts = [judge(im, p, style, new_shapes).ok for im, p in zip(images, prompts)]
    counts = [len(parse_caption(p).objects) for p in prompts]
    by = {n: [v for v, c in zip(verdicts, counts) if c == n] for n in (1, 2)}
    return float(np.mean(verdicts)), *(float(np.mean(by[n])) if by[n] else None for n in (1, 2))


def _settings(methods: list[Method], config: EvalConfig) -> list[tuple[Method, int, float]]:
    """(method, steps, w) to run, the teacher first (others are compared with it); `none` once per step count."""
    settings = []
    for method in sorted(methods, key=lambda m: m.name != "cfg"):
        steps_list = config.steps if method.step_counts is None else list(method.step_counts)
        steps_list = steps_list + [s for s in config.cfg_steps if s not in steps_list] if method.name == "cfg" else steps_list
        for steps in steps_list:
            for w in [1.0] if method.mode == "none" else config.scales:
                settings.append((method, steps, w))
    return settings


def _sampling_order(settings: list[tuple[Method, int, float]], reference: int) -> list[int]:
    """Indices into `settings` in the order to sample them, so that every row finds what it is compared with: CFG and
    then no guidance at the most steps, then CFG and no guidance at the others, then the guides. Rows are reported in
    `settings` order."""
    rank = {"cfg": 0, "none": 1}

    def key(index):
        method, steps, _ = settings[index]
        return (method.name not in rank or steps != reference, rank.get(method.name, 2))

    return sorted(range(len(settings)), key=key)


def draws_shapes(pipe) -> bool:
    """Whether the model is of the embedded shapes world, the only one the adherence judge and the shapes FID
    features can score: its models read prompts with the BERT encoder embedded.components builds, while SD 1.x,
    2.x and SDXL checkpoints read them with CLIP."""
    return type(pipe.text_encoder).__name__ == "BertModel" and getattr(pipe, "text_encoder_2", None) is None


def evaluate_model(spec: ModelSpec, methods: list[Method], config: EvalConfig, scorer: FidScorer | None, timing: bool,
                   notes: list[str] | None = None) -> tuple[list[Row], dict]:
    """All rows for one model, and the images of the grid (first `grid_prompts` prompts, first seed, largest w).
    Metrics that cannot apply to the model are skipped, with a sentence appended to `notes`."""
    sd = load_pipeline(spec.base, spec.lora, resolve_dtype(config.dtype, config.device), config.device)
    pipe = as_plug_and_play(sd)  # PlugAndPlayXLPipeline for an SDXL folder
    pipe.set_progress_bar_config(disable=True)
    for method in methods:
        if method.guide is not None:
            method.guide.check_compatible(pipe.unet)
            method.guide.check_text_encoder(pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    prompts = eval_prompts(config)
    shapes_world = draws_shapes(pipe)
    judgeable = shapes_world and _judgeable(prompts)
    if not shapes_world and (scorer is None or config.fid_features == "shapes" or config.reference is None):
        scorer = None  # the shapes FID network and held-out shapes images say nothing about another model's images
    if not shapes_world and notes is not None:
        notes.append(f"{spec.name}: a {type(sd).__name__} checkpoint, not of the embedded shapes world: adherence (the shapes judge) "
                     + ("skipped; FID with the given reference." if scorer else "and FID (shapes features or no --reference) skipped."))
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if scorer is not None:
        scorer.set_reference(spec.style, len(prompts), image_size=resolution)
    negative = encode_negative(pipe, pipe.device, resolution).to(pipe.device, pipe.unet.dtype)  # encoded in fp32
    negatives = eval_negatives(config.negative_prompts, prompts)
    teacher_negative = negative if negatives is None else encode_negatives(pipe, negatives, negative, pipe.device, resolution).to(pipe.device, pipe.unet.dtype)
    avoidable = judgeable and negatives is not None and measurable(negatives) > 0
    if negatives is not None and notes is not None:
        notes.append(_negatives_note(spec.name, negatives, avoidable, methods))
    if notes is not None:
        notes += _default_interval_notes(methods)
    tokens = pipe.tokenizer.model_max_length
    costs = {m.name: step_cost(pipe.unet, m.guide, tokens=tokens) for m in methods}
    rows, grid, references = {}, {}, _References()
    settings, reference = _settings(methods, config), reference_steps(config)
    for index in tqdm(_sampling_order(settings, reference), desc=f"eval {spec.name}"):
        method, steps, w = settings[index]
        row = Row(spec.name, method.name, steps, w, len(prompts), method.negative_prompt)
        per_seed = {"fid": [], "adh": [], "avoid": [], "psnr": [], "mse": [], "unguided_mse": [], "reference_mse": [], "reference_unguided_mse": [],
                    "out": [], "step_errors": Counter(), "step_baselines": Counter()}
        for seed in config.seeds:
            teacher_scale = max(config.scales) if method.mode == "none" else w
            trajectory = TeacherTrajectory() if method.name == "cfg" else None
            images, output_mse, (unet_images, guide_images) = sample(pipe, method, prompts, steps, w, seed, config.batch_size, teacher_negative,
                                                                     teacher_scale, trajectory)
            row.unet_evals_per_image, row.guide_evals_per_image = unet_images / len(prompts), guide_images / len(prompts)
            references.keep(method, (steps, w, seed), images, trajectory)
            if scorer is not None:
                per_seed["fid"].append(scorer.score(images))
            if judgeable:
                per_seed["adh"].append(_adherence_split(images, prompts, spec.style, spec.new_shapes))
            if avoidable:
                per_seed["avoid"].append(avoidance_rate(images, negatives, spec.style))
            _compare_with_cfg(per_seed, row, pipe, method, images, references, (steps, teacher_scale, seed), negative)
            _compare_with_reference(per_seed, images, references, (steps, teacher_scale, seed), reference)
            if output_mse is not None:
                per_seed["out"].append(output_mse)
            if seed == config.seeds[0] and w in (1.0, max(config.scales)) and _in_grid(method, steps, config):
                grid[(method.name, steps)] = images[: config.grid_prompts]
        _fill_quality(row, per_seed)
        _fill_compute(row, method, costs[method.name], pipe)
        if timing and (method.mode == "none" or w == max(config.scales)):
            _fill_speed(row, pipe, method, prompts, steps, w)
        rows[index] = row
    return [rows[index] for index in range(len(settings))], {"prompts": prompts[: config.grid_prompts], "negatives": (negatives or [])[: config.grid_prompts], "images": grid}


def _default_interval_notes(methods: list[Method]) -> list[str]:
    """Guides whose own policy guides only inside an interval, said once each."""
    intervals = {m.name.split(" ")[0]: m.guide.policy.interval for m in methods if m.guide is not None and m.guide.policy.interval}
    return [f"{name} guides only at t in [{low:g}, {high:g}], its policy's interval, in rows without negative prompts (w = 1, one UNet pass, below); "
            f"the gaps are against CFG at every step." for name, (low, high) in intervals.items()]


def _negatives_note(model: str, negatives: list[str], avoidable: bool, methods: list[Method]) -> str:
    """What the report's negative-prompt figures mean for this model, and which guides ignore the negatives."""
    ignoring = [m.name for m in methods if m.guide is not None and m.negative_prompt and not m.guide.reads_negative_prompt]
    text = (f"{model}: cfg and guide rows sample with each prompt's negative prompt, '{NO_NEGATIVE.strip()}' rows without; "
            "gap closed and output MSE are against CFG with the negative. ")
    text += (f"avoids negative: over the {measurable(negatives)} of {len(negatives)} images whose negative names a colour, shape or coloured shape. "
             if avoidable else "avoids negative: not measurable here (needs the shapes world and negatives naming a colour or shape). ")
    return text + (f"Guides that do not read negative prompts (same images with and without): {', '.join(ignoring)}." if ignoring else "")


@dataclass
class _References:
    """What rows are compared with: CFG's images and recorded trajectory per (steps, w, seed), and no guidance's
    images per (steps, seed). The teacher runs first and `none` before the guides (see `_settings`)."""

    cfg_images: dict = field(default_factory=dict)
    trajectories: dict = field(default_factory=dict)
    unguided_images: dict = field(default_factory=dict)

    def keep(self, method: Method, key: tuple[int, float, int], images: list[Image.Image], trajectory: TeacherTrajectory | None) -> None:
        if method.name == "cfg":
            self.cfg_images[key], self.trajectories[key] = images, trajectory
        elif method.mode == "none":
            self.unguided_images[(key[0], key[2])] = images


def reference_steps(config: EvalConfig) -> int:
    """The step count whose CFG images are the reference for rows sampled in fewer steps (e.g. 50 for 8-step guides)."""
    return max(config.steps + config.cfg_steps)


def _compare_with_reference(per_seed: dict, images, references: _References, key: tuple[int, float, int], steps: int) -> None:
    """Against CFG and no guidance at `steps` (more than the row's): how far a few-step row is from what many steps give."""
    cfg_images, unguided = references.cfg_images.get((steps, *key[1:])), references.unguided_images.get((steps, key[2]))
    if key[0] < steps and cfg_images is not None and unguided is not None:
        per_seed["reference_mse"].append(image_mse(images, cfg_images))
        per_seed["reference_unguided_mse"].append(image_mse(unguided, cfg_images))


def _compare_with_cfg(per_seed: dict, row: Row, pipe, method: Method, images, references: _References, key: tuple[int, float, int], negative) -> None:
    """Against CFG at `key` = (steps, w, seed): PSNR and MSE of the images (and no guidance's MSE, for the image gap),
    and the squared output errors of the method and of the conditional model at the teacher's recorded states."""
    cfg_images, unguided = references.cfg_images.get(key), references.unguided_images.get((key[0], key[2]))
    if cfg_images is not None and method.name != "cfg":
        per_seed["psnr"].append(mean_psnr(images, cfg_images))
        per_seed["mse"].append(image_mse(images, cfg_images))
        if unguided is not None:
            per_seed["unguided_mse"].append(image_mse(unguided, cfg_images))
    trajectory = references.trajectories.get(key)
    if trajectory is not None and not method.carried:  # a carried step depends on the steps before: no replay at the teacher's states
        pipe.guide = method.guide
        errors, baselines = trajectory.squared_errors(pipe, method.mode, row.guidance_scale, negative, method.negative_prompt)
        per_seed["step_errors"].update(errors)  # Counter.update adds: summed over seeds, timestep by timestep
        per_seed["step_baselines"].update(baselines)
        row.step_gap_images = trajectory.images


def _in_grid(method: Method, steps: int, config: EvalConfig) -> bool:
    """The grid shows every method at the most steps run, step-distilled guides at theirs, and the cfg-only step counts."""
    return steps == max(config.steps) or method.step_counts is not None or (method.name == "cfg" and steps in config.cfg_steps)


def _fill_quality(row: Row, per_seed: dict) -> None:
    if per_seed["fid"]:
        row.fid_per_seed, row.fid = per_seed["fid"], float(np.mean(per_seed["fid"]))
    if per_seed["adh"]:
        columns = list(zip(*per_seed["adh"]))
        row.adherence, row.adherence_one_object, row.adherence_two_objects = (
            float(np.mean(c)) if None not in c else None for c in columns
        )
    if per_seed["avoid"]:
        row.avoids_negative = float(np.mean(per_seed["avoid"]))
    if per_seed["psnr"]:
        row.psnr_vs_cfg_db, row.mse_vs_cfg = float(np.mean(per_seed["psnr"])), float(np.mean(per_seed["mse"]))
    if per_seed["out"]:
        row.output_mse_vs_cfg = float(np.mean(per_seed["out"]))
    if per_seed["unguided_mse"] and len(per_seed["unguided_mse"]) == len(per_seed["mse"]):  # every seed: pooled MSEs
        row.image_gap_closed = gap_closed(float(np.mean(per_seed["mse"])), float(np.mean(per_seed["unguided_mse"])))
    if per_seed["reference_mse"] and len(per_seed["reference_mse"]) == len(per_seed["reference_unguided_mse"]):
        row.reference_image_gap_closed = gap_closed(float(np.mean(per_seed["reference_mse"])), float(np.mean(per_seed["reference_unguided_mse"])))
    if per_seed["step_baselines"]:
        row.step_gap_closed, row.step_gap_closed_per_timestep = step_gaps(per_seed["step_errors"], per_seed["step_baselines"])


def _fill_compute(row: Row, method: Method, cost, pipe) -> None:
    row.gflops_per_image = (row.unet_evals_per_image * cost.unet + row.guide_evals_per_image * cost.guide) / 1e9
    row.parameters = parameter_count(pipe.unet) + (parameter_count(method.guide) if method.guide is not None else 0)


def _fill_speed(row: Row, pipe, method: Method, prompts: list[str], steps: int, w: float) -> None:
    """Median wall time per image of whole pipeline calls (text encoder, sampling, VAE decode), batch 1 and 8,
    sampled as the row's images were."""
    pipe.guide = method.guide
    scale, policy = 1.0 if method.mode == "none" else w, method.policy(pipe, steps, prompts)
    for batch in (1, 8):
        def call(batch=batch):
            return pipe(prompts[:batch], guidance_scale=scale, num_inference_steps=steps, output_type="np", mode=method.mode, policy=policy)
        seconds = median_seconds(call, repeats=3, warmup=1) / batch
        if batch == 1:
            row.seconds_per_image_b1 = seconds
        else:
            row.seconds_per_image_b8 = seconds
            row.peak_memory_mb_b8 = peak_memory_bytes(call) / 2**20


def run_eval(config: EvalConfig) -> dict:
    """Evaluate; write report.json, report.md, plots and grids to `out_dir`; return the report."""
    from . import report as report_module

    if config.transfer:
        from ..embedded.transfer import run_transfer

        return run_transfer(config)

    specs = [parse_model_spec(m) for m in config.base]  # bad specs fail before anything slow
    if "guide" in config.methods:  # a guide for another kind of base (SDXL vs SD 1.x/2.x): one line, nothing loaded
        for spec in specs:
            for folder in config.guide or shipped_guide_dirs():
                check_guide_fits_base(folder, spec.base or default_base_dir())
    methods = build_methods(config)
    if not methods:
        raise ValueError("no methods to evaluate")
    eval_prompts(config)  # a bad prompt file fails before anything slow
    scorer = make_fid_scorer(config.fid_features, config.inception_weights, config.reference)
    settings = _settings(methods, config)
    evaluations = sum(steps * (2 if method.name == "cfg" else 1) for method, steps, _ in settings) * config.images * len(config.seeds)
    tqdm.write(f"pnpguide eval: {len(specs)} model(s) x {len(settings)} settings x {config.images} images x {len(config.seeds)} seed(s) "
               f"= {evaluations * len(specs):,} UNet evaluations (the embedded UNet does ~150-200 per second per CPU core)", file=sys.stderr)
    rows, grids, notes = [], {}, []
    for index, spec in enumerate(specs):
        model_rows, grids[spec.name] = evaluate_model(spec, methods, config, scorer, timing=config.speed and index == 0, notes=notes)
        rows += model_rows
    result = {
        "notes": notes,
        "config": dataclasses.asdict(config),
        "fid_features": scorer.describe() if scorer else None,
        "environment": {"torch": torch.__version__, "device": config.device, "dtype": config.dtype, "threads": torch.get_num_threads(), "machine": platform.machine()},
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    report_module.write_report(result, grids, Path(config.out_dir))
    return result


def summary(result: dict) -> list[dict]:
    """The headline numbers per row, for scripts (`pnpguide eval --json`)."""
    if result.get("kind") == "transfer":
        return result["rows"]
    keys = ("model", "method", "steps", "guidance_scale", "fid", "fid_per_seed", "adherence", "avoids_negative", "psnr_vs_cfg_db", "image_gap_closed", "step_gap_closed",
            "unet_evals_per_image", "gflops_per_image", "seconds_per_image_b8")
    return [{k: row[k] for k in keys} for row in result["rows"]]
