"""Check that a base folder and a guide fit together, without sampling anything.

`check_pair` runs every check it can and reports each as a :class:`Check`, so one report lists all
the problems instead of the first traceback. Nothing is ever unpickled: a folder holding pickle weights
fails before anything is loaded from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from .guides import GuideModel, OutputGuide
from .guides.base import UNET_KINDS, conditioning_mismatch, text_encoder_signature, unrecorded_text_encoder
from .guides.residual import residual_channels
from .loading import (
    GUIDE_WEIGHTS,
    PICKLE_SUFFIXES,
    PREDICTION_TYPES,
    check_model_dir,
    default_base_dir,
    default_guide_dir,
    guide_base_mismatch,
    load_guide,
    load_pipeline,
)

CHECK_ERRORS = (OSError, ValueError, RuntimeError)  # what the loaders raise for bad folders; other errors are bugs


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, whether it passed, and the value or the problem."""

    name: str
    ok: bool
    detail: str


def check_pair(base: str | Path | None = None, guide: str | Path | None = None, lora: str | Path | None = None,
               prompts: list[str] | None = None) -> list[Check]:
    """Validate a base SD folder (default: the embedded model) and a guide folder (default: the shipped default guide).

    Checks the base folder's structure, that it holds no pickle weights and loads offline, that the guide
    folder is safe and readable, the scheduler's prediction type, the guide's trained guidance range, and
    that the guide fits the UNet (conditioning kind, architecture and residuals) and the text encoders (SDXL:
    both). Checks that need a folder that failed are left out; when the two config.json files already show that
    the guide was built for another kind of UNet (SDXL vs SD 1.x/2.x, other widths), nothing is loaded. With `lora`
    (LoRA weights for the base) and `prompts`, also whether the guide reaches that fine-tune (its distance from the base).
    """
    base_dir = Path(base) if base is not None else default_base_dir()
    guide_dir = Path(guide) if guide is not None else default_guide_dir()
    checks: list[Check] = []
    if not _configs_fit(guide_dir, base_dir, checks):
        return checks
    pipe = _check_base(base_dir, checks)
    guide_model = _check_guide(guide_dir, checks)
    if pipe is not None:
        checks += [_text_encoders(pipe), _prediction_type(pipe.scheduler)]
    if guide_model is not None:
        checks += [_guidance_range(guide_model), _policy(guide_model)]
    if pipe is not None and guide_model is not None and lora is not None:
        checks.append(_reach(pipe, lora, prompts or []))
    if pipe is not None and guide_model is not None:
        checks += [_conditioning(guide_model, pipe.unet), _compatibility(guide_model, pipe.unet),
                   _text_encoder(guide_model, pipe), _residuals(guide_model, pipe.unet)]
    return checks


def format_checks(checks: list[Check]) -> str:
    """One line per check: `OK   name: detail` or `FAIL name: detail` (line breaks in a detail become spaces)."""
    return "\n".join(f"{'OK' if check.ok else 'FAIL':<4} {check.name}: {_one_line(check.detail)}" for check in checks)


def _configs_fit(guide_dir: Path, base_dir: Path, checks: list[Check]) -> bool:
    """False (with a FAIL line) when both folders are readable and their configs show a guide for the other kind
    of UNet (SDXL vs SD 1.x/2.x): then no other check means anything. Broken folders and other mismatches are
    reported by the checks that follow."""
    try:
        problem = guide_base_mismatch(guide_dir, base_dir, conditioning_mismatch)
    except CHECK_ERRORS:
        return True
    if problem:
        checks.append(Check("guide fits the base (configs)", False, problem))
    return problem is None


def _check_base(path: Path, checks: list[Check]) -> StableDiffusionPipeline | StableDiffusionXLPipeline | None:
    """Append the base folder checks; return the loaded pipeline, or None when a check failed."""
    try:
        check_model_dir(path)  # its structure and the UNet's and scheduler's config fields
        _refuse_pickles(path)
    except CHECK_ERRORS as error:
        checks.append(Check("base folder", False, _one_line(error)))
        return None
    components = sorted(p.name for p in path.iterdir() if p.is_dir())
    checks.append(Check("base folder", True, f"{path}: model_index.json, {', '.join(components)}; no pickle weights"))
    try:
        pipe = load_pipeline(path)
    except CHECK_ERRORS as error:
        checks.append(Check("base loads offline", False, _one_line(error)))
        return None
    unet = pipe.unet.config
    detail = f"{type(pipe).__name__}, UNet block_out_channels={tuple(unet.block_out_channels)}, cross_attention_dim={unet.cross_attention_dim}"
    checks.append(Check("base loads offline", True, detail))
    return pipe


def _refuse_pickles(path: Path) -> None:
    """diffusers falls back to `.bin` files when a safetensors file is missing, and unpickling can run code."""
    pickles = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{path} holds pickle weights {pickles}; pnpguide never unpickles: convert them to safetensors")


def _check_guide(path: Path, checks: list[Check]) -> GuideModel | None:
    """Append the guide folder check (load_guide refuses pickles and unreadable safetensors); return the guide or None."""
    try:
        guide = load_guide(path)
    except CHECK_ERRORS as error:
        checks.append(Check("guide files", False, _one_line(error)))
        return None
    parameters = sum(p.numel() for p in guide.parameters())
    checks.append(Check("guide files", True, f"{path}: config.json, {GUIDE_WEIGHTS} ({parameters:,} parameters); no pickles"))
    return guide


def _text_encoders(pipe) -> Check:
    """Every text encoder and tokenizer the pipeline class needs was loaded (SDXL: two of each)."""
    names = ("text_encoder", "tokenizer") + (("text_encoder_2", "tokenizer_2") if isinstance(pipe, StableDiffusionXLPipeline) else ())
    missing = [name for name in names if getattr(pipe, name, None) is None]
    if missing:
        return Check("text encoders", False, f"{type(pipe).__name__} needs {', '.join(missing)}; the folder has none")
    return Check("text encoders", True, text_encoder_signature(pipe.text_encoder, getattr(pipe, "text_encoder_2", None)))


def _conditioning(guide: GuideModel, unet) -> Check:
    """SDXL's UNet also reads the pooled prompt and size/crop ids; a guide built for the other kind cannot fit."""
    guide_kind, unet_kind = guide.config.addition_embed_type, unet.config.addition_embed_type
    detail = f"guide built for {UNET_KINDS.get(guide_kind, guide_kind)}, base has {UNET_KINDS.get(unet_kind, unet_kind)}"
    return Check("conditioning kind", guide_kind == unet_kind, detail)


def _prediction_type(scheduler) -> Check:
    kind = scheduler.config.prediction_type
    if kind in PREDICTION_TYPES:
        return Check("prediction type", True, kind)
    return Check("prediction type", False, f"{kind!r} is not supported; use a scheduler with {' or '.join(PREDICTION_TYPES)}")


def _guidance_range(guide: GuideModel) -> Check:
    trained = guide.config.trained_guidance_range
    if trained is None:
        return Check("trained guidance range", False, "not recorded: an untrained guide, or not saved by `pnpguide distill`")
    low, high = trained  # a valid range: load_guide checked the config's fields
    negatives = ("reads negative prompts (a negative head, skipped when the negative prompt is empty)" if guide.reads_negative_prompt
                 else "negative prompts ignored (distilled against the empty prompt)")
    return Check("trained guidance range", True, f"w in [{low}, {high}]; {negatives}")


def _policy(guide: GuideModel) -> Check:
    """How the pipeline samples this guide when a call gives no policy, in words."""
    return Check("sampling policy", True, guide.policy.describe())


def _reach(pipe, lora, prompts: list[str]) -> Check:
    """Whether a guide distilled on the base carries to base + these LoRA weights: `measure_lora_distance`, with them
    loaded into the base's pipeline for the measurement and unloaded after it (the other checks read the base)."""
    from .loading import load_lora, plug_and_play_from
    from .pipeline import REACH

    if not prompts:
        return Check("guide reaches the LoRA", False, "give --prompts FILE (a few prompts like yours) to measure it")
    try:
        load_lora(pipe, lora)
        distance = plug_and_play_from(pipe).measure_lora_distance(prompts)
    except CHECK_ERRORS as error:
        return Check("guide reaches the LoRA", False, _one_line(error))
    finally:
        pipe.unload_lora_weights()
    if distance <= REACH:
        return Check("guide reaches the LoRA", True, f"distance {distance:.2f} <= {REACH:g}: its CFG images stay near the base's")
    return Check("guide reaches the LoRA", False, f"distance {distance:.2f} > {REACH:g}: the guide will not carry to it; sample it with "
                 "--mode cfg and a policy fitted on it (pnpguide fit-carry --lora, --adaptive-threshold 0.995)")


def _compatibility(guide: GuideModel, unet) -> Check:
    try:
        guide.check_compatible(unet)
    except ValueError as error:
        return Check("guide fits the UNet", False, str(error))
    return Check("guide fits the UNet", True, "in_channels, cross_attention_dim, block_out_channels and layers_per_block match")


def _text_encoder(guide: GuideModel, pipe) -> Check:
    text_encoders = pipe.text_encoder, getattr(pipe, "text_encoder_2", None)
    trained = guide.config.trained_text_encoder
    if trained is None:  # the pipeline only warns; here it is a failed check, with the same words
        return Check("guide fits the text encoder", False, unrecorded_text_encoder(text_encoder_signature(*text_encoders)))
    try:
        guide.check_text_encoder(*text_encoders)
    except ValueError as error:
        return Check("guide fits the text encoder", False, str(error))
    return Check("guide fits the text encoder", True, f"trained with {trained}")


def _residuals(guide: GuideModel, unet) -> Check:
    """The widths the guide's projections emit must be the UNet's skip-connection widths, one for one (an output guide
    emits none: it corrects the UNet's output, whose channels it must have)."""
    if isinstance(guide, OutputGuide):
        emitted, expected = guide.output_head.conv_out.out_channels, unet.config.out_channels
        if emitted != expected:
            return Check("residuals", False, f"the guide corrects a {emitted}-channel output, the UNet's has {expected}; retrain the guide")
        return Check("residuals", True, f"none: the guide corrects the UNet's {expected}-channel output")
    expected = residual_channels(unet.config.block_out_channels, unet.config.layers_per_block)
    emitted, mid_emitted = guide.residual_widths()
    mid_expected = unet.config.block_out_channels[-1]
    if emitted != expected or mid_emitted != mid_expected:
        detail = f"the guide emits {emitted} + mid {mid_emitted}, the UNet takes {expected} + mid {mid_expected}; retrain the guide"
        return Check("residuals", False, detail)
    return Check("residuals", True, f"{len(expected)} skip residuals + 1 mid residual with the UNet's widths")


def _one_line(text: Exception | str) -> str:
    return " ".join(str(text).split())
