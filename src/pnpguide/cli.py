"""pnpguide: one UNet pass per step instead of classifier-free guidance's two, with a small guide network distilled
while the text-to-image UNet stays frozen (Plug-and-Play Diffusion Distillation). Every command works on the embedded
model when no --base is given."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path

from .cli_args import add_config_flags, add_device_flags, config_from_args, count, guidance_scale, placement

USER_ERRORS = (ValueError, OSError, RuntimeError, KeyError)  # OSError covers missing and unreadable files
PROGRESS_DELAY_S = 2  # sampling shows its progress bar once it has run this long
CARRY_FIT_PROMPTS = 16  # fit-carry samples CFG on this many prompts (the factors hardly depend on which: docs/findings.md)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (exit code 2, as argparse's own)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _threads(args) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def cmd_distill(args) -> None:
    from .distill_guidance import GuidanceDistillConfig, train_guide

    from accelerate import PartialState

    config = config_from_args(GuidanceDistillConfig, args)
    train_guide(config, base_data(config))
    if PartialState().is_main_process:  # under `accelerate launch`, say it once
        print(f"guide saved to {Path(config.output_dir) / 'guide'}")


def cmd_distill_steps(args) -> None:
    from .distill_steps import StepDistillConfig, distill_steps

    config = config_from_args(StepDistillConfig, args)
    for steps, folder in distill_steps(config, base_data(config)).items():
        print(f"{steps}-step guide saved to {folder}")


def base_data(config):
    """The embedded world's own data on the embedded base, for a run given neither --prompts nor --images; else None."""
    from .sources import is_embedded

    if not is_embedded(config.base):
        return None
    from .embedded.source import ShapesData

    return ShapesData()


def _check_lora(lora: str | None) -> None:
    """A missing LoRA folder fails before any weights load."""
    if lora is not None:
        from .loading import lora_dir

        lora_dir(lora)


def cmd_generate(args) -> None:
    from .generate import GenerateRequest, check_request, generate
    from .loading import load_plug_and_play, warn_if_truncated

    request = GenerateRequest(
        args.prompt, args.out, args.negative_prompt, args.num_images, args.height, args.width, args.steps, args.w, args.mode,
        args.scheduler, args.seed, args.device, args.dtype, args.correction_carry, args.guidance_interval, args.adaptive_threshold,
    )
    device, dtype = check_request(request, args.base, args.guide)  # before the slow part
    _check_lora(args.lora)
    pipe = load_plug_and_play(args.base, args.guide, args.lora, dtype, device)
    warn_if_truncated(pipe.tokenizer, [args.prompt])
    pipe.set_progress_bar_config(desc="sampling", delay=PROGRESS_DELAY_S)
    paths = generate(pipe, request)
    print(f"image{'s' if len(paths) > 1 else ''} written to {', '.join(map(str, paths))}")


def cmd_demo(args) -> None:
    from .demo import run_demo, timing_table

    device, dtype = placement(args)
    grid, timings = run_demo(args.out_dir, args.guide, args.steps, args.w, args.seed, progress=lambda line: print(line, file=sys.stderr, flush=True),
                             device=device, dtype=dtype, negative_prompts=args.negative_prompts)
    print(timing_table(timings))
    print(f"\ngrid (rows: no guidance | CFG | the guide | the other shipped guides) written to {grid}")


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
    _check_lora(args.lora)
    prompts = read_prompt_file(args.prompts) if args.prompts else _embedded_fit_prompts()  # a bad file fails before the weights load
    pipe = load_plug_and_play(args.base, None, args.lora, resolve_dtype(args.dtype, device), device)
    if args.scheduler is not None:
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    carry = CorrectionCarry.fit(pipe, prompts[:CARRY_FIT_PROMPTS], full_steps=args.full_steps, num_inference_steps=args.steps,
                                height=args.height, width=args.width)
    print(f"correction carry ({len(carry.factors)} model calls, CFG for the first {carry.full_steps} steps) written to {carry.save(args.out)}")


def _embedded_prompts(count: int) -> list[str]:
    """Held-out captions of the embedded model, half one-object and half two-object."""
    from .embedded import shapes

    return shapes.evaluation_captions(count)


def _embedded_fit_prompts() -> list[str]:
    from .embedded import shapes

    return shapes.split_captions(CARRY_FIT_PROMPTS, split="train", seed=7)


def cmd_doctor(args) -> int:
    from .doctor import check_pair, format_checks
    from .sources import is_embedded, read_prompt_file

    _check_lora(args.lora)
    prompts = read_prompt_file(args.prompts) if args.prompts else (_embedded_prompts(8) if args.lora and is_embedded(args.base) else None)
    checks = check_pair(args.base, args.guide, args.lora, prompts)
    print(format_checks(checks))
    return 0 if all(c.ok for c in checks) else 1


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
    from .embedded.cli import add_embedded_commands

    selected = chosen_command(argv) if argv is not None else None

    def add_flags(p: argparse.ArgumentParser, command: str) -> None:
        if argv is None or command == selected:
            add_config_flags(p, config_class(command))

    parser = Parser(prog="pnpguide", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--threads", type=count, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of a one-line message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job: no guidance | CFG | the guides on the embedded model, a grid and a timing table")
    p.add_argument("--out-dir", default="pnpguide-demo", help="folder for grid.png (default: pnpguide-demo)")
    p.add_argument("--guide", default=None, help="guide folder or shipped name (default: default); the other shipped guides are added")
    p.add_argument("--steps", type=count, default=25, help="sampling steps of no guidance, CFG and the guide (default: 25)")
    p.add_argument("--w", type=guidance_scale, default=7.5, help="guidance scale, diffusers' convention (default: 7.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--negative-prompts", default=None, help="a file of negatives (one per line, cycled over the columns) or "
                   "caption-attributes (each caption's first colour, shape or coloured shape): adds rows of CFG and the guide with them")
    add_device_flags(p)
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("generate", help="images from a prompt: the guide (default), CFG or no guidance")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default=None, help="negative prompt: applied by CFG and by a guide with a negative head "
                   "(the default guide has one; others ignore it, with a warning)")
    p.add_argument("--num-images", type=count, default=1, help="images to generate; several are written as OUT-0.png, OUT-1.png, ... (default: 1)")
    p.add_argument("--height", type=count, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=count, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--scheduler", default=None, metavar="NAME", help=f"sampler, built from the base's scheduler config: {', '.join(_scheduler_names())} (default: the base's own)")
    _add_pipeline_flags(p)
    add_device_flags(p)
    p.add_argument("--mode", choices=["guide", "cfg", "none"], default="guide", help="guide: one UNet pass per step; cfg: two (diffusers' CFG); none: w = 1 (default: guide)")
    p.add_argument("--steps", type=count, default=None, help="sampling steps (default: the guide's own, 25 for the default guide; else 50)")
    p.add_argument("--w", type=guidance_scale, default=7.5, help="guidance scale, diffusers' convention (default: 7.5)")
    p.add_argument("--correction-carry", default=None, metavar="FILE", help="policy: a CorrectionCarry (pnpguide fit-carry): the "
                   "first steps run the full correction (CFG's two passes in --mode cfg), then it is carried on, one UNet pass per "
                   "step; the training-free path for any checkpoint (default: the guide's own policy; plain CFG in --mode cfg)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("T_LOW", "T_HIGH"),
                   help="policy: guidance only at timesteps T_LOW <= t <= T_HIGH, one plain UNet pass elsewhere (Kynkaanniemi et al. 2024)")
    p.add_argument("--adaptive-threshold", type=float, default=None, metavar="COS", help="policy, --mode cfg: Adaptive Guidance, CFG per "
                   "image until the cosine of its conditional and unconditional outputs reaches COS; with --correction-carry, its "
                   "correction is carried on after that")
    p.add_argument("--seed", type=int, default=0, help="random seed; image i uses seed + i (default: 0)")
    p.add_argument("--out", default="image.png", help="PNG file to write (default: image.png)")
    p.set_defaults(handler=cmd_generate)

    for name, help_text, handler in (
        ("distill", "stage 1: train a guide so one UNet pass matches CFG (the base stays frozen)", cmd_distill),
        ("distill-steps", "stage 2: step distillation of a guide to few steps (an explicit grid: --student-timesteps; or halving rounds 32 -> 16 -> 8)", cmd_distill_steps),
    ):
        p = sub.add_parser(name, help=help_text)
        add_flags(p, name)
        p.set_defaults(handler=handler)

    p = sub.add_parser("fit-carry", help="fit a CorrectionCarry on a model (JSON for generate --correction-carry): training-free, any checkpoint")
    p.add_argument("--base", default=None, help="Stable Diffusion folder (default: the embedded model)")
    p.add_argument("--lora", default=None, help="LoRA weights to load into the base: a folder, or bar-lora / outline-lora (shipped for the embedded model) (the carry is the model's own)")
    p.add_argument("--prompts", default=None, help="text or JSONL file of prompts like the ones you will sample; CFG runs on "
                   f"the first {CARRY_FIT_PROMPTS} (default on the embedded model: {CARRY_FIT_PROMPTS} of its training captions)")
    p.add_argument("--full-steps", type=count, default=5, help="steps that run CFG before the correction is carried (default: 5)")
    p.add_argument("--steps", type=count, default=25, help="sampling steps the carry is fitted at; other step counts read it at their own timesteps (default: 25)")
    p.add_argument("--scheduler", default=None, metavar="NAME", help=f"sampler the carry is fitted with: {', '.join(_scheduler_names())} (default: the base's own)")
    p.add_argument("--height", type=count, default=None, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=count, default=None, help="image width in pixels (default: the model's)")
    p.add_argument("--out", default="carry.json", help="JSON file to write (default: carry.json)")
    add_device_flags(p)
    p.set_defaults(handler=cmd_fit_carry)

    p = sub.add_parser("eval", help="FID, adherence, fidelity to CFG, compute and speed of none | cfg | guides; report + plots")
    add_flags(p, "eval")
    p.add_argument("--json", action="store_true", help="print a JSON summary to stdout instead of the markdown report")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("doctor", help="check that a base folder and a guide fit together, and how the guide samples (exit 1 if not)")
    _add_pipeline_flags(p, lora=False)
    p.add_argument("--lora", default=None, help="LoRA weights for the base: also measure whether the guide reaches base + LoRA "
                   "(its CFG images' distance from the base's, on 8 prompts)")
    p.add_argument("--prompts", default=None, help="with --lora: a text or JSONL file of prompts like yours (default on the embedded model: its captions)")
    p.set_defaults(handler=cmd_doctor)

    p = sub.add_parser("embedded", help="build and inspect the embedded model, its fine-tunes, judge and FID features")
    add_embedded_commands(p, add_flags)
    for p in [*sub.choices.values(), *_subcommands(sub.choices["embedded"])]:  # also after the command; SUPPRESS keeps a --debug given before it
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    return parser


EPILOG = """commands, by what they are for:
  use a guide       demo, generate, doctor
  make a guide      distill (stage 1), distill-steps (stage 2), fit-carry (training-free)
  measure           eval
  embedded model    embedded train-vae | train-base | finetune | train-features | judge-accuracy | base-grid | base-adherence"""


def _subcommands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(actions[0].choices.values()) if actions else []


def _add_pipeline_flags(p: argparse.ArgumentParser, lora: bool = True) -> None:
    p.add_argument("--base", default=None, help="Stable Diffusion folder (default: the embedded model)")
    p.add_argument("--guide", default=None, help="guide folder, or a guide shipped for the embedded model: default (25 steps), "
                   "8-step, 4-step, paper (the paper's residual design) (default: default with the embedded model; with --base, none)")
    if lora:
        p.add_argument("--lora", default=None, help="LoRA weights to load into the base: a folder, or bar-lora / outline-lora (shipped for the embedded model)")


def _scheduler_names() -> list[str]:
    from .schedulers import SCHEDULERS  # imports nothing heavy

    return list(SCHEDULERS)


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
