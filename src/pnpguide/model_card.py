"""A guide folder's model card (`README.md`), as Hub model repositories carry one: what the guide is for, how to use it,
how it samples, the command that made it and what was measured."""

from __future__ import annotations

import dataclasses
from pathlib import Path

CARD = "README.md"


def write_model_card(folder: str | Path, guide, config=None, command: str = "distill", measured: str | None = None) -> Path:
    """Write `folder/README.md` for `guide` (saved in `folder`): `config` is the training config the command ran with (its
    non-default fields become the command line; without it, `command` is the whole command line), `measured` a markdown
    table of measured figures (None: not measured)."""
    folder = Path(folder)
    base = getattr(config, "base", None) or "pnpguide's embedded base"
    if getattr(config, "lora", None):
        base = f"{base} with the LoRA weights {config.lora}"
    design = type(guide).__name__
    lines = [
        "---",
        "library_name: pnpguide",
        "tags: [pnpguide, guidance-distillation, plug-and-play-diffusion-distillation, diffusers]",
        "---",
        f"# {folder.name}",
        "",
        f"A pnpguide {design} for {base}: with it, one UNet pass per step stands in for classifier-free guidance's two "
        "(Hsiao et al., *Plug-and-Play Diffusion Distillation*, CVPR 2024). The base UNet is unchanged.",
        "",
        "## Use",
        "",
        "```python",
        "from pnpguide import GuideModel, PlugAndPlayPipeline",
        "",
        f'guide = GuideModel.from_pretrained("{folder.name}")  # this folder',
        'pipe = PlugAndPlayPipeline.from_pretrained("path/to/base", guide=guide)',
        'image = pipe("a prompt", guidance_scale=7.5).images[0]',
        "```",
        "",
        f"or `pnpguide generate --base path/to/base --guide {folder.name} --prompt \"a prompt\"`.",
        "",
        "## How it samples",
        "",
        guide.policy.describe() + ".",
        "",
        f"Trained for w in {list(guide.config.trained_guidance_range or ['?', '?'])}, with the text encoder "
        f"{guide.config.trained_text_encoder or '(not recorded)'}.",
        "",
        "## How it was made",
        "",
        "```bash",
        command_line(command, config) if config is not None else command if command.startswith("pnpguide") else f"pnpguide {command}",
        "```",
        "",
        "## Measured",
        "",
        measured or f"Not measured yet: `pnpguide eval --base {eval_base(config)} --guide {folder.name}`.",
        "",
    ]
    path = folder / CARD
    path.write_text("\n".join(lines))
    return path


def eval_base(config) -> str:
    """The model as `pnpguide eval --base` names it: a folder (or the embedded one), with its LoRA weights."""
    base = (getattr(config, "base", None) or "embedded") if config is not None else "embedded"
    lora = getattr(config, "lora", None)
    return f"{base},lora={lora}" if lora else base


def command_line(command: str, config) -> str:
    """`pnpguide COMMAND` with a flag for each field of `config` that differs from its default."""
    words = [f"pnpguide {command}"]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if value == default or field.name in ("overwrite", "resume"):
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{field.name.replace('_', '-')}")
        elif isinstance(value, (list, tuple)):
            words.append(f"{flag} {' '.join(map(str, value))}")
        else:
            words.append(f"{flag} {value}")
    return " ".join(words)
