"""`pnpguide embedded ...`: the commands that build and inspect the embedded model's world (its VAE, base, fine-tunes,
FID features and adherence judge). They are how the shipped assets were made (scripts/build_embedded.sh), not what
a user of pnpguide needs."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_train_vae(args) -> None:
    from ..cli_args import config_from_args
    from .base import VAETrainConfig, train_vae

    config = config_from_args(VAETrainConfig, args)
    train_vae(config)
    print(f"VAE saved to {Path(config.output_dir) / 'vae'}")


def cmd_train_base(args) -> None:
    from ..cli_args import config_from_args
    from .base import BaseTrainConfig, train_base

    config = config_from_args(BaseTrainConfig, args)
    train_base(config)
    print(f"pipeline saved to {Path(config.output_dir) / 'pipeline'}")


def cmd_finetune(args) -> None:
    from ..cli_args import config_from_args
    from .finetune import FinetuneConfig, finetune

    config = config_from_args(FinetuneConfig, args)
    path = finetune(config)
    print(f"fine-tune saved to {path}")


def cmd_train_features(args) -> None:
    from ..cli_args import config_from_args
    from .features import FeatureTrainConfig, attribute_accuracy, train_features

    config = config_from_args(FeatureTrainConfig, args)
    model = train_features(config)
    print("held-out attribute accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in attribute_accuracy(model).items()))
    print(f"feature network saved to {Path(config.output_dir) / 'features'}")


def cmd_judge_accuracy(args) -> None:
    from .adherence import judge_accuracy
    from .shapes import STYLES, check_concept

    if args.concept is not None:
        check_concept(args.concept)
    print("| style | images | accepts true captions | rejects wrong captions |\n|---|---|---|---|")
    for style in args.styles or STYLES:
        result = judge_accuracy(style, args.images, concept=args.concept)
        shown = f" (every scene shows a {args.concept})" if args.concept else ""
        print(f"| {style}{shown} | {result.images} | {result.accepts_true_captions:.3f} | {result.rejects_wrong_captions:.3f} |")


def cmd_base_grid(args) -> None:
    from ..cli_args import placement
    from .base_report import base_grid

    device, dtype = placement(args)
    path = base_grid(args.base, args.out, args.lora, args.style, args.steps, args.seed, dtype, device)
    print(f"grid written to {path}")


def cmd_base_adherence(args) -> None:
    from ..cli_args import placement
    from .base_report import base_adherence_table

    device, dtype = placement(args)
    print(base_adherence_table(args.base, args.lora, args.style, args.prompts, args.steps, args.scales, args.seed, args.split, dtype, device))


def add_embedded_commands(parser: argparse.ArgumentParser, add_flags) -> None:
    """The `embedded` group's subcommands; `add_flags(p, name)` adds a training command's config flags."""
    from ..cli_args import add_device_flags, count, guidance_scale

    sub = parser.add_subparsers(dest="embedded_command", required=True, metavar="COMMAND")
    for name, help_text, handler in (
        ("train-vae", "train the embedded model's VAE on the shapes data (all styles)", cmd_train_vae),
        ("train-base", "train the embedded text-to-image UNet (needs a VAE from train-vae)", cmd_train_base),
        ("finetune", "fine-tune a base on another style: the whole UNet or a LoRA", cmd_finetune),
        ("train-features", "train the FID feature network on the shapes data (all styles)", cmd_train_features),
    ):
        p = sub.add_parser(name, help=help_text)
        add_flags(p, name)
        p.set_defaults(handler=handler)

    p = sub.add_parser("judge-accuracy", help="measure the prompt-adherence judge on real dataset images")
    p.add_argument("--styles", nargs="*", help="styles to measure (default: all)")
    p.add_argument("--images", type=count, default=500, help="images per style (default: 500)")
    p.add_argument("--concept", default=None, help="scenes that show this new shape, e.g. bar (a fine-tune's concept), judged with it "
                   "in the judge's vocabulary; wrong captions may swap it for a base shape (default: the base's scenes)")
    p.set_defaults(handler=cmd_judge_accuracy)

    def add_model_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--base", default=None, help="Stable Diffusion folder (default: the embedded model)")
        p.add_argument("--lora", default=None, help="folder with LoRA weights to load into the base")
        p.add_argument("--style", default="flat", help="style the model draws, for the judge's palette (default: flat)")
        p.add_argument("--steps", type=count, default=25, help="sampling steps (default: 25)")
        p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
        add_device_flags(p)

    p = sub.add_parser("base-grid", help="image grid of a base or fine-tune at w = 1 and w = 7.5")
    add_model_flags(p)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(handler=cmd_base_grid)

    p = sub.add_parser("base-adherence", help="prompt adherence of a base or fine-tune at several w, with two-object failures split by cause")
    add_model_flags(p)
    p.add_argument("--prompts", type=count, default=100, help="captions per object count (default: 100)")
    p.add_argument("--split", choices=("heldout", "train"), default="heldout",
                   help="held-out caption combinations (never trained on), or training ones: to tell what a model failed to learn "
                   "from what it failed to generalise (default: heldout)")
    p.add_argument("--scales", type=guidance_scale, nargs="+", default=[1.0, 7.5], help="guidance scales (default: 1 7.5)")
    p.set_defaults(handler=cmd_base_adherence)
