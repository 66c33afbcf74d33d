"""`pnpguide` command line: a thin layer over the library; each handler builds a config and calls one function."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import shlex
import signal
import sys
import threading
import types
import typing
import warnings
from pathlib import Path

USER_ERRORS = (ValueError, OSError, RuntimeError, KeyError)  # OSError covers missing and unreadable files
PROGRESS_DELAY_S = 2  # sampling shows its progress bar once it has run this long
CARRY_FIT_PROMPTS = 16  # fit-carry samples CFG on this many prompts (the factors hardly depend on which: docs/guides.md)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (exit code 2, as argparse's own)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def count(text: str) -> int:
    """An argparse type: an integer >= 1 (images, prompts, steps)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def whole_number(text: str) -> int:
    """An argparse type: an integer >= 0 (steps of a kind, where none is allowed)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def guidance_scale(text: str) -> float:
    """An argparse type: a finite w > 0 (diffusers' convention: 1 = no guidance)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (1 = no guidance), got {text}")
    return value


def w_schedule(text: str) -> str:
    """An argparse type: a `--w-schedule` whose syntax is right (its length and values are checked by the pipeline)."""
    from .schedules import parse_w_schedule

    try:
        parse_w_schedule(text, 2)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--w-schedule ")) from None
    return text


def field_comments(config_class) -> dict[str, str]:
    """The `# comment` beside each field in the config's source: the field's documentation, written once."""
    comments: dict[str, str] = {}
    for klass in reversed(config_class.__mro__):
        if dataclasses.is_dataclass(klass):
            for match in re.finditer(r"^\s+(\w+): [^#\n]*#\s*(.+)$", inspect.getsource(klass), re.MULTILINE):
                comments[match.group(1)] = match.group(2)
    return comments


def add_config_flags(parser: argparse.ArgumentParser, config_class) -> None:
    """One flag per dataclass field, so each default lives in the config alone (guided-diffusion's idea).

    List fields take one or more values and may be repeated (`--base a --base b` = `--base a b`)."""
    hints = typing.get_type_hints(config_class)
    comments = field_comments(config_class)
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        default = _default(field)
        comment = comments.get(field.name, field.name.replace("_", " "))
        help_text = (comment if "(default:" in comment else f"{comment} (default: {default})").replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        base = _without_none(kind)
        if typing.get_origin(base) is list:
            parser.add_argument(flag, type=typing.get_args(base)[0], nargs="+", action="extend", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=base, default=default, help=help_text)


def _without_none(kind):
    """`X | None` -> X; anything else unchanged."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return next(t for t in typing.get_args(kind) if t is not type(None))
    return kind


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def config_from_args(config_class, args: argparse.Namespace):
    """The config from parsed flags; list flags left out keep the config's default."""
    fields = dataclasses.fields(config_class)
    return config_class(**{f.name: _default(f) if getattr(args, f.name) is None else getattr(args, f.name) for f in fields})


def _threads(args) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def cmd_train_vae(args) -> None:
    from .embedded.base import VAETrainConfig, train_vae

    config = config_from_args(VAETrainConfig, args)
    train_vae(config)
    print(f"VAE saved to {Path(config.output_dir) / 'vae'}")


def cmd_train_base(args) -> None:
    from .embedded.base import BaseTrainConfig, train_base

    config = config_from_args(BaseTrainConfig, args)
    train_base(config)
    print(f"pipeline saved to {Path(config.output_dir) / 'pipeline'}")


def cmd_finetune(args) -> None:
    from .embedded.finetune import FinetuneConfig, finetune

    config = config_from_args(FinetuneConfig, args)
    path = finetune(config)
    print(f"fine-tune saved to {path}")


def cmd_train_features(args) -> None:
    from .embedded.features import FeatureTrainConfig, attribute_accuracy, train_features

    config = config_from_args(FeatureTrainConfig, args)
    model = train_features(config)
    print("held-out attribute accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in attribute_accuracy(model).items()))
    print(f"feature network saved to {Path(config.output_dir) / 'features'}")


def cmd_distill(args) -> None:
    from .distill_guidance import GuidanceDistillConfig, train_guide

    from accelerate import PartialState

    config = config_from_args(GuidanceDistillConfig, args)
    train_guide(config)
    if PartialState().is_main_process:  # under `accelerate launch`, say it once
        print(f"guide saved to {Path(config.output_dir) / 'guide'}")


def cmd_distill_steps(args) -> None:
    from .distill_steps import StepDistillConfig, distill_steps

    for steps, folder in distill_steps(config_from_args(StepDistillConfig, args)).items():
        print(f"{steps}-step guide saved to {folder}")


def cmd_generate(args) -> None:
    from .generate import GenerateRequest, check_request, generate, guide_carry
    from .loading import load_plug_and_play, warn_if_truncated

    request = GenerateRequest(
        args.prompt, args.out, args.negative_prompt, args.num_images, args.height, args.width, args.steps, args.w, args.w_schedule,
        args.guidance_interval, args.mode, args.scheduler, args.seed, args.device, args.dtype, args.cfg_first_steps,
        args.first_step_fit, args.correction_carry,
    )
    device, dtype = check_request(request, args.base, args.guide)  # before the slow part
    request.guide_carry = guide_carry(args.guide)
    pipe = load_plug_and_play(args.base, args.guide, args.lora, dtype, device)
    warn_if_truncated(pipe.tokenizer, [args.prompt])
    pipe.set_progress_bar_config(desc="sampling", delay=PROGRESS_DELAY_S)
    paths = generate(pipe, request)
    print(f"image{'s' if len(paths) > 1 else ''} written to {', '.join(map(str, paths))}")


def placement(args):
    """(torch.device, torch.dtype) from --device and --dtype, checked to run here before any model loads."""
    from .devices import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    return device, resolve_dtype(args.dtype, device)


def cmd_demo(args) -> None:
    from .demo import run_demo, timing_table

    device, dtype = placement(args)
    grid, timings = run_demo(args.out_dir, args.guide, args.steps, args.w, args.seed, progress=lambda line: print(line, file=sys.stderr, flush=True),
                             device=device, dtype=dtype, negative_prompts=args.negative_prompts)
    print(timing_table(timings))
    print(f"\ngrid (rows: no guidance | CFG teacher | guide | step-distilled guides) written to {grid}")


def cmd_fidelity(args) -> None:
    from .evaluation.fidelity import fidelity, fidelity_markdown
    from .loading import load_plug_and_play

    device, dtype = placement(args)
    pipe = load_plug_and_play(args.base, args.guide, args.lora, dtype, device)
    rows = fidelity(pipe, args.style, args.prompts, args.scales, args.steps_list, args.seed)
    name = f"{args.base or 'embedded base'}{' + ' + args.lora if args.lora else ''}, guide {args.guide or 'shipped tiny'}"
    print(fidelity_markdown(rows, name))


def cmd_eval(args) -> None:
    import json

    from .evaluation.evaluate import EvalConfig, run_eval, summary

    config = config_from_args(EvalConfig, args)
    result = run_eval(config)
    (Path(config.out_dir) / "command.txt").write_text("pnpguide " + shlex.join(args.argv) + "\n")  # how to regenerate it
    if args.json:
        print(json.dumps(summary(result), indent=2))
    else:
        print((Path(config.out_dir) / "report.md").read_text())
        print(f"report, plots and grids written to {config.out_dir}/")


def cmd_fit_carry(args) -> None:
    from .carry import CorrectionCarry
    from .devices import resolve_device, resolve_dtype
    from .loading import load_plug_and_play
    from .schedulers import check_scheduler_name, scheduler_from_name
    from .sources import is_embedded, read_prompt_file

    if args.prompts is None and not is_embedded(args.base):
        raise ValueError("fit-carry with --base needs --prompts FILE: prompts like the ones you will sample (CFG runs on them)")
    if args.scheduler is not None:
        check_scheduler_name(args.scheduler)
    device = resolve_device(args.device)
    prompts = read_prompt_file(args.prompts) if args.prompts else _embedded_fit_prompts()  # a bad file fails before the weights load
    pipe = load_plug_and_play(args.base, None, args.lora, resolve_dtype(args.dtype, device), device)
    if args.scheduler is not None:
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    carry = CorrectionCarry.fit(pipe, prompts[:CARRY_FIT_PROMPTS], full_steps=args.full_steps, num_inference_steps=args.steps,
                                height=args.height, width=args.width)
    print(f"correction carry ({len(carry.factors)} model calls, CFG for the first {carry.full_steps} steps) written to {carry.save(args.out)}")


def _embedded_fit_prompts() -> list[str]:
    from .embedded import shapes

    return shapes.split_captions(CARRY_FIT_PROMPTS, split="train", seed=7)


def cmd_doctor(args) -> int:
    from .doctor import check_pair, format_checks

    checks = check_pair(args.base, args.guide)
    print(format_checks(checks))
    return 0 if all(c.ok for c in checks) else 1


def cmd_judge_accuracy(args) -> None:
    from .embedded.shapes import STYLES, check_concept
    from .embedded.adherence import judge_accuracy

    if args.concept is not None:
        check_concept(args.concept)
    print("| style | images | accepts true captions | rejects wrong captions |\n|---|---|---|---|")
    for style in args.styles or STYLES:
        result = judge_accuracy(style, args.images, concept=args.concept)
        print(f"| {style}{f' (every scene shows a {args.concept})' if args.concept else ''} | {result.images} | {result.accepts_true_captions:.3f} | {result.rejects_wrong_captions:.3f} |")


def cmd_sample_grid(args) -> None:
    from .embedded.base_report import base_grid

    device, dtype = placement(args)
    path = base_grid(args.base, args.out, args.lora, args.style, args.steps, args.seed, dtype, device)
    print(f"grid written to {path}")


def cmd_base_adherence(args) -> None:
    from .embedded.base_report import base_adherence_table

    device, dtype = placement(args)
    print(base_adherence_table(args.base, args.lora, args.style, args.prompts, args.steps, args.scales, args.seed, args.split, dtype, device))


CONFIG_CLASSES = {  # command -> "module:ConfigClass", imported only when that command runs (or shows its --help)
    "distill": "distill_guidance:GuidanceDistillConfig",
    "distill-steps": "distill_steps:StepDistillConfig",
    "train-vae": "embedded.base:VAETrainConfig",
    "train-base": "embedded.base:BaseTrainConfig",
    "finetune": "embedded.finetune:FinetuneConfig",
    "train-features": "embedded.features:FeatureTrainConfig",
    "eval": "evaluation.evaluate:EvalConfig",
}


def quiet_libraries() -> None:
    """Silence what diffusers and transformers print that a pnpguide user cannot act on; our own bars stay."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # e.g. "CLIPImageProcessor falls back to PIL" (no torchvision)
    diffusers_logging.set_verbosity_error()  # its "expected CLIPTextModel" warning is noise for a BERT text encoder
    diffusers_logging.disable_progress_bar()  # component-loading bars
    transformers_logging.disable_progress_bar()


def config_class(command: str):
    import importlib

    quiet_libraries()
    module, name = CONFIG_CLASSES[command].split(":")
    return getattr(importlib.import_module(f".{module}", __package__), name)


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand in `argv` (the first word that names one), so only its flags are built: each command's
    flags come from its config class, whose module imports diffusers, and `pnpguide --help` should not wait
    for that."""
    return next((word for word in argv if word in CONFIG_CLASSES), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the chosen command's config flags are built (all of them without it)."""
    selected = chosen_command(argv) if argv is not None else None

    def add_flags(p: argparse.ArgumentParser, command: str) -> None:
        if argv is None or command == selected:
            add_config_flags(p, config_class(command))

    parser = Parser(prog="pnpguide", description=__doc__)
    parser.add_argument("--threads", type=count, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of a one-line message")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the main job: no guidance | CFG | guide on the embedded model, grid + timing table")
    p.add_argument("--out-dir", default="pnpguide-demo", help="folder for grid.png (default: pnpguide-demo)")
    p.add_argument("--guide", default=None, help="guide folder or shipped name (default: tiny); step-distilled guides are added")
    p.add_argument("--steps", type=count, default=25, help="sampling steps (default: 25)")
    p.add_argument("--w", type=guidance_scale, default=7.5, help="guidance scale, diffusers' convention (default: 7.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--negative-prompts", default=None, help="a file of negatives (one per line, cycled over the columns) or "
                   "caption-attributes (each caption's first colour, shape or coloured shape): adds rows of CFG and the guide with them")
    _add_device_flags(p)
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("generate", help="images from a prompt, with the guide (default), CFG or no guidance")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default=None, help="negative prompt: --mode cfg uses it, and --mode guide with a guide distilled with --negatives (other guides ignore it, with a warning)")
    p.add_argument("--num-images", type=count, default=1, help="images to generate; several are written as OUT-0.png, OUT-1.png, ... (default: 1)")
    p.add_argument("--height", type=count, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=count, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--scheduler", default=None, metavar="NAME", help=f"sampler, built from the base's scheduler config: {', '.join(_scheduler_names())} (default: the base's own)")
    _add_pipeline_flags(p)
    _add_device_flags(p)
    p.add_argument("--mode", choices=["guide", "cfg", "none"], default="guide", help="guide: 1 UNet pass per step; cfg: 2; none: w=1")
    p.add_argument("--steps", type=count, default=None, help="sampling steps (default: 25, or a step-distilled guide's own count)")
    p.add_argument("--w", type=guidance_scale, default=7.5, help="guidance scale, diffusers' convention (default: 7.5)")
    p.add_argument(
        "--w-schedule", type=w_schedule, default=None, metavar="SCHEDULE",
        help="w per step instead of --w: 'W1,W2,...' (one w >= 1 per step) or 'linear:W0:W1' (a ramp from the "
        "first step to the last)",
    )
    p.add_argument(
        "--guidance-interval", type=float, nargs=2, default=None, metavar=("T_LOW", "T_HIGH"),
        help="apply w only at timesteps T_LOW <= t <= T_HIGH (0..num_train_timesteps, e.g. 1000), w = 1 elsewhere "
        "(Kynkaanniemi et al. 2024); those steps run the UNet once, without guide or CFG (default: every step; in guide mode, "
        "without --negative-prompt, the guide's default_guidance_interval if it records one: output-16step and output-8step guide only at t >= 500; "
        "0 1000 guides every step)",
    )
    p.add_argument(
        "--cfg-first-steps", type=whole_number, default=0, metavar="K",
        help="--mode guide: run the first K steps with CFG (2 UNet passes), the rest with the guide. The first, "
        "high-noise steps set the layout and hold most of what a guide misses of CFG: K = 2 of 25 brings images much "
        "closer to CFG's for 2 more UNet passes (27, against CFG's 50); --negative-prompt applies in those steps (default: 0)",
    )
    p.add_argument(
        "--first-step-fit", action="store_true",
        help="--mode guide: run the first step as CFG in one UNet pass, its unconditional pass taken from an affine fit "
        "made first from 64 pure-noise passes (pnpguide.FirstStepFit). On the embedded model it "
        "brings images closer to CFG's at the guide's cost (docs/guides.md)",
    )
    p.add_argument(
        "--correction-carry", default=None, metavar="FILE",
        help="a CorrectionCarry saved as JSON (pnpguide.CorrectionCarry.fit(pipe, prompts).save(FILE), once "
        "per model, scheduler and step count). CFG runs in full for its first steps, then one UNet pass per step with "
        "CFG's last correction carried on: with 5 of 25 steps in full, 0.88-0.93 of the way to CFG's image at 0.60 of "
        "its UNet passes on the embedded model, no guide needed. With --mode guide and an output guide distilled on the first "
        "steps (--trajectory-first-steps), the guide runs those steps and its correction is carried on (docs/guides.md) (default: none)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed; image i uses seed + i (default: 0)")
    p.add_argument("--out", default="image.png", help="PNG file to write (default: image.png)")
    p.set_defaults(handler=cmd_generate)

    training_commands = (
        ("distill", "stage 1: train a guide so one UNet pass matches CFG (the base stays frozen)", cmd_distill),
        ("distill-steps", "stage 2: progressive step distillation of a guide (32 -> 16 -> 8 steps)", cmd_distill_steps),
        ("train-vae", "train the embedded model's VAE on the shapes data (all styles)", cmd_train_vae),
        ("train-base", "train the embedded text-to-image UNet (needs a VAE from train-vae)", cmd_train_base),
        ("finetune", "fine-tune a base on another style: the whole UNet or a LoRA", cmd_finetune),
        ("train-features", "train the FID feature network on the shapes data (all styles)", cmd_train_features),
    )
    for name, help_text, handler in training_commands:
        p = sub.add_parser(name, help=help_text)
        add_flags(p, name)
        p.set_defaults(handler=handler)

    p = sub.add_parser("fit-carry", help="fit a CorrectionCarry for a model, scheduler and step count (JSON for generate --correction-carry)")
    p.add_argument("--base", default=None, help="Stable Diffusion folder (default: the embedded model)")
    p.add_argument("--lora", default=None, help="folder with LoRA weights to load into the base (the carry is the model's own)")
    p.add_argument("--prompts", default=None, help="text or JSONL file of prompts like the ones you will sample; CFG runs on "
                   f"the first {CARRY_FIT_PROMPTS} (default on the embedded model: {CARRY_FIT_PROMPTS} of its training captions)")
    p.add_argument("--full-steps", type=count, default=5, help="steps that run CFG (or an output guide) before the correction is "
                   "carried; with K = 5 of 25, 0.88-0.93 of the image gap to CFG on the embedded model (default: 5)")
    p.add_argument("--steps", type=count, default=25, help="sampling steps the carry is for (default: 25)")
    p.add_argument("--scheduler", default=None, metavar="NAME", help=f"sampler the carry is for: {', '.join(_scheduler_names())} (default: the base's own)")
    p.add_argument("--height", type=count, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=count, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--out", default="carry.json", help="JSON file to write (default: carry.json)")
    _add_device_flags(p)
    p.set_defaults(handler=cmd_fit_carry)

    p = sub.add_parser("fidelity", help="guide vs its CFG teacher on held-out captions: adherence and PSNR")
    _add_pipeline_flags(p)
    p.add_argument("--style", default="flat", help="style the model draws, for the judge's palette (default: flat)")
    p.add_argument("--prompts", type=count, default=40, help="held-out captions per object count (default: 40)")
    p.add_argument("--scales", type=guidance_scale, nargs="+", default=[3.0, 5.0, 7.5], help="guidance scales (default: 3 5 7.5)")
    p.add_argument("--steps-list", type=count, nargs="+", default=[16, 25], help="step counts (default: 16 25)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _add_device_flags(p)
    p.set_defaults(handler=cmd_fidelity)

    p = sub.add_parser("eval", help="FID, adherence, fidelity to CFG, compute and speed of none | cfg | guides; report + plots")
    add_flags(p, "eval")
    p.add_argument("--json", action="store_true", help="print a JSON summary to stdout instead of the markdown report")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("doctor", help="check that a base folder and a guide fit together (exit 1 if not)")
    _add_pipeline_flags(p, lora=False)
    p.set_defaults(handler=cmd_doctor)

    p = sub.add_parser("judge-accuracy", help="measure the prompt-adherence judge on real dataset images")
    p.add_argument("--styles", nargs="*", help="styles to measure (default: all)")
    p.add_argument("--images", type=count, default=500, help="images per style")
    p.add_argument("--concept", default=None, help="scenes that show this new shape, e.g. bar (a fine-tune's concept), "
                   "judged with it in the judge's vocabulary; wrong captions may swap it for a base shape (default: the base's scenes)")
    p.set_defaults(handler=cmd_judge_accuracy)

    p = sub.add_parser("base-grid", help="image grid of a base or fine-tune at w = 1 and w = 7.5")
    _add_model_flags(p)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(handler=cmd_sample_grid)

    p = sub.add_parser(
        "base-adherence",
        help="prompt adherence of a base or fine-tune at several w, with two-object failures split by cause",
    )
    _add_model_flags(p)
    p.add_argument("--prompts", type=count, default=100, help="captions per object count")
    p.add_argument(
        "--split",
        choices=("heldout", "train"),
        default="heldout",
        help="held-out caption combinations (never trained on), or training ones: to tell what a model failed to learn "
        "from what it failed to generalise (default: heldout)",
    )
    p.add_argument("--scales", type=guidance_scale, nargs="+", default=[1.0, 7.5], help="guidance scales")
    p.set_defaults(handler=cmd_base_adherence)
    for p in sub.choices.values():  # also after the command; SUPPRESS keeps a --debug given before it
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    return parser


def _add_pipeline_flags(p: argparse.ArgumentParser, lora: bool = True) -> None:
    p.add_argument("--base", default=None, help="Stable Diffusion folder (default: the embedded model)")
    p.add_argument("--guide", default=None, help="guide folder, or a shipped guide: tiny, full, tiny-16step, tiny-8step, output, output-first5, output-neg, output-first5-neg, output-16step, output-8step (the last four read negative prompts) (default: tiny with the embedded model; with --base, none: --mode cfg or none)")
    if lora:
        p.add_argument("--lora", default=None, help="folder with LoRA weights to load into the base")


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="weights and activations; bfloat16 also speeds up CPU sampling (default: float32)")


def _scheduler_names() -> list[str]:
    from .schedulers import SCHEDULERS  # imports nothing heavy

    return list(SCHEDULERS)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=None, help="Stable Diffusion folder (default: the embedded model)")
    p.add_argument("--lora", default=None, help="folder with LoRA weights to load into the base")
    p.add_argument("--style", default="flat", help="style the model draws, for the judge's palette")
    p.add_argument("--steps", type=count, default=25, help="sampling steps")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    _add_device_flags(p)


def one_line_warnings(prefix: str) -> None:
    """pnpguide's own warnings as one line, like its errors ("pnpguide generate: warning: ..."), instead of Python's
    file:line plus a source line that points into the library; other libraries' warnings keep Python's format."""
    package = str(Path(__file__).parent)
    default = getattr(warnings.formatwarning, "python_default", warnings.formatwarning)  # not a wrapper of a wrapper

    def formatted(message, category, filename, lineno, line=None):
        if str(filename).startswith(package):
            return f"{prefix}: warning: {' '.join(str(message).split())}\n"
        return default(message, category, filename, lineno, line)

    formatted.python_default = default
    warnings.formatwarning = formatted


class CtrlC:
    """Remembers a Ctrl-C: C code (torch, safetensors) can turn the KeyboardInterrupt it raises into another error,
    which must still be reported as an interruption, not as bad input."""

    def __init__(self):
        self.pressed = False

    def __call__(self, signum, frame):
        self.pressed = True
        signal.default_int_handler(signum, frame)

    def __enter__(self):
        self.previous = signal.getsignal(signal.SIGINT)
        watching = threading.current_thread() is threading.main_thread() and self.previous is signal.default_int_handler
        if watching:  # an ignored SIGINT (a background job) or a caller's own handler stays as it is
            signal.signal(signal.SIGINT, self)
        self.watching = watching
        return self

    def __exit__(self, *exc_info):
        if self.watching:
            signal.signal(signal.SIGINT, self.previous)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exit_:  # a usage error: return its code as for every other error (--help still exits)
        if exit_.code in (0, None):
            raise
        return exit_.code
    args.argv = argv  # for reports that record how to regenerate them
    _threads(args)
    quiet_libraries()
    one_line_warnings(f"pnpguide {args.command}")
    with CtrlC() as ctrl_c:
        return _run(args, ctrl_c)


def _run(args, ctrl_c: CtrlC) -> int:
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        return _interrupted(args)
    except Exception as error:
        if args.debug:
            raise
        if ctrl_c.pressed:  # whatever the Ctrl-C turned into on its way out
            return _interrupted(args)
        if not isinstance(error, USER_ERRORS):
            raise
        message = " ".join(str(error).split())  # one line, even for multi-line library messages
        print(f"pnpguide {args.command}: error: {message}", file=sys.stderr)
        return 2


def _interrupted(args) -> int:
    print(f"pnpguide {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
