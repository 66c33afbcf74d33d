"""Silencing library notices that a pnpguide user cannot act on, and nothing else."""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quieted(logger_name: str):
    """Within the block, the logger `logger_name` reports errors only."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quiet_casts():
    """diffusers (0.42) warns at every cast of any model to a dtype that "there are modules that should be kept in float32:
    []" (its check reads an empty list as a list of modules): nothing to keep, nothing to act on."""
    return quieted("diffusers.models.modeling_utils")


def quiet_component_types():
    """diffusers warns when a component is not of the class its pipeline names ("Expected types for text_encoder: CLIPTextModel,
    got BertModel"): the embedded base's text encoder is a BERT by design, and the pipeline runs it as it should."""
    return quieted("diffusers.pipelines.pipeline_utils")


@contextlib.contextmanager
def quiet_text_encoder_lora():
    """diffusers warns "No LoRA keys associated to <text encoder> found" when LoRA weights train the UNet alone, as most do
    (and every LoRA of the embedded model): the warning itself says it is safe to ignore."""
    with quieted("diffusers.loaders.lora_base"), quieted("diffusers.loaders.lora_pipeline"), quieted("diffusers.loaders.peft"):
        yield
