"""The paper's design (Hsiao et al., CVPR 2024): a narrow, ControlNet-like copy of the UNet's encoder.

It reads what the UNet reads (noisy latent, timestep, prompt embeddings) plus the guidance scale w, and returns one
residual per UNet skip connection and one for the mid block, through zero-initialised 1x1 convolutions; the UNet
takes them through `down_block_additional_residuals` / `mid_block_additional_residual`, where ControlNet's go. At 1/8
of the UNet's width, with no attention at the highest resolution, it is 0.9% of SD1.5's UNet. It stays in pnpguide to
reproduce the paper; the output design comes closer to CFG for less (docs/method.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block
from diffusers.utils import BaseOutput
from torch import nn

from .base import GuideModel, per_sample, zero_module
from .base import ModelMixin  # noqa: F401 (diffusers finds a saved pipeline component's loader by this name in its class's module)

WIDTH_DIVISOR = 8  # 1/8 of the UNet's width: ~0.9% of SD1.5's parameters
MIN_CHANNELS = 16
HEAD_DIM = 8  # attention head width: a multiple of 8, as fused GPU attention kernels want
W_EMBED_SCALE = 100.0  # w in [1, 15] -> [100, 1500]: the range the sinusoidal timestep embedding is built for


@dataclass
class GuideOutput(BaseOutput):
    """Residuals named and shaped as UNet2DConditionModel's keyword arguments expect them.

    down_block_additional_residuals: one (batch, channels_i, h_i, w_i) tensor per UNet skip connection.
    mid_block_additional_residual: (batch, channels_mid, h_mid, w_mid).
    """

    down_block_additional_residuals: tuple[torch.Tensor, ...]
    # None only while BaseOutput rebuilds an output from a mapping (accelerate does, casting a mixed-precision model's
    # outputs back to fp32): `GuideOutput({...})` then fills both fields from it
    mid_block_additional_residual: torch.Tensor = None


class ResidualGuide(GuideModel):
    """The paper's residual guide; build one for a UNet with :meth:`from_unet`. The `unet_*` fields record the
    architecture it fits, so plugging it into another UNet fails in one line instead of giving wrong images."""

    @register_to_config
    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (16, 16, 16),
        unet_block_out_channels: tuple[int, ...] = (48, 96, 96),
        unet_in_channels: int = 4,
        unet_cross_attention_dim: int = 384,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        layers_per_block: int = 1,
        transformer_layers_per_block: int | tuple[int, ...] = 1,  # one value, or one per down block
        num_attention_heads: int | tuple[int, ...] = 4,  # one value, or one per down block
        use_linear_projection: bool = False,
        norm_num_groups: int = 8,
        norm_eps: float = 1e-5,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        guidance_embed_dim: int = 64,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        projection_class_embeddings_input_dim: int | None = None,
        trained_guidance_range: tuple[float, float] | None = None,
        trained_text_encoder: str | None = None,
        trained_timesteps: tuple[int, ...] | None = None,
        trained_schedule: dict | None = None,
        default_guidance_interval: tuple[float, float] | None = None,
    ):
        super().__init__()
        layers, heads = _per_block(transformer_layers_per_block, block_out_channels), _per_block(num_attention_heads, block_out_channels)
        _check_config(block_out_channels, unet_block_out_channels, down_block_types, norm_num_groups, heads)
        if addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type {addition_embed_type!r} is not supported; only 'text_time' (SDXL)")
        width0, time_embed_dim = block_out_channels[0], block_out_channels[0] * 4
        self.time_proj = Timesteps(width0, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(width0, time_embed_dim)
        self.conv_in = nn.Conv2d(unet_in_channels, width0, kernel_size=3, padding=1)
        self.guidance_proj = Timesteps(guidance_embed_dim, flip_sin_to_cos, freq_shift)
        self.guidance_embedding = TimestepEmbedding(guidance_embed_dim, time_embed_dim)
        if addition_embed_type == "text_time":  # SDXL's size/crop conditioning, as its ControlNet reads it
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        self.down_blocks = nn.ModuleList()
        widths_in = (width0,) + tuple(block_out_channels[:-1])
        for i, (block_type, width_in, width) in enumerate(zip(down_block_types, widths_in, block_out_channels, strict=True)):
            self.down_blocks.append(get_down_block(
                block_type, num_layers=layers_per_block, transformer_layers_per_block=layers[i], in_channels=width_in,
                out_channels=width, temb_channels=time_embed_dim, add_downsample=i < len(block_out_channels) - 1,
                resnet_eps=norm_eps, resnet_act_fn="silu", resnet_groups=norm_num_groups, cross_attention_dim=unet_cross_attention_dim,
                num_attention_heads=heads[i], attention_head_dim=width // heads[i], downsample_padding=1,
                use_linear_projection=use_linear_projection,
            ))
        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=block_out_channels[-1], temb_channels=time_embed_dim, transformer_layers_per_block=layers[-1],
            resnet_eps=norm_eps, resnet_groups=norm_num_groups, cross_attention_dim=unet_cross_attention_dim,
            num_attention_heads=heads[-1], use_linear_projection=use_linear_projection,
        )
        # zero-initialised projections from the guide's widths to the UNet's: an untrained guide adds exact zeros
        pairs = zip(residual_channels(block_out_channels, layers_per_block), residual_channels(unet_block_out_channels, layers_per_block))
        self.down_projections = nn.ModuleList(zero_module(nn.Conv2d(c_in, c_out, 1)) for c_in, c_out in pairs)
        self.mid_projection = zero_module(nn.Conv2d(block_out_channels[-1], unet_block_out_channels[-1], 1))

    @classmethod
    def from_unet(cls, unet) -> "ResidualGuide":
        """A new (zero) guide for `unet`, 1/8 of its width with no attention at the highest resolution (there attention's
        cost grows with tokens squared, not width, and would be about half of the guide's FLOPs on SD1.5)."""
        config = unet.config
        if config.mid_block_type not in (None, "UNetMidBlock2DCrossAttn"):
            raise ValueError(f"UNets with mid_block_type={config.mid_block_type!r} are not supported")
        widths = tuple(max(MIN_CHANNELS, math.ceil(c / WIDTH_DIVISOR / 8) * 8) for c in config.block_out_channels)
        return cls(
            block_out_channels=widths, unet_block_out_channels=tuple(config.block_out_channels), unet_in_channels=config.in_channels,
            unet_cross_attention_dim=config.cross_attention_dim, down_block_types=("DownBlock2D",) + tuple(config.down_block_types[1:]),
            layers_per_block=config.layers_per_block, transformer_layers_per_block=(1,) * len(widths),
            num_attention_heads=tuple(w // HEAD_DIM for w in widths), use_linear_projection=config.use_linear_projection,
            norm_eps=config.norm_eps, flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=config.freq_shift,
            addition_embed_type=config.addition_embed_type, addition_time_embed_dim=config.addition_time_embed_dim,
            projection_class_embeddings_input_dim=config.projection_class_embeddings_input_dim,
        )

    @classmethod
    def translated_config(cls, config: dict) -> dict:
        """An older pnpguide's latent-reading guide: the same fields, less those of other designs."""
        config = super().translated_config(config)
        for other in ("size", "reads", "unet_out_channels", "negative_head", "trained_first_steps", "negative_first_steps", "step_heads"):
            config.pop(other, None)
        return config

    @property
    def reads_negative_prompt(self) -> bool:
        return False

    def residual_widths(self) -> tuple[list[int], int]:
        """Channels of the residuals this guide emits: one per UNet skip connection, and the mid block's."""
        return [conv.out_channels for conv in self.down_projections], self.mid_projection.out_channels

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        guidance_scale: torch.Tensor | float,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> GuideOutput:
        """sample: (B, C, h, w) noisy latents; encoder_hidden_states: (B, tokens, dim); timestep and guidance_scale:
        scalars or (B,) tensors; added_cond_kwargs: SDXL's text_embeds and time_ids."""
        batch = sample.shape[0]
        w = per_sample(guidance_scale, batch, sample.device, torch.float32)
        emb = self.time_embedding_of(timestep, batch, sample.dtype)
        emb = emb + self.guidance_embedding(self.guidance_proj(w * W_EMBED_SCALE).to(sample.dtype))
        if self.config.addition_embed_type == "text_time":
            emb = emb + self._added_embedding(added_cond_kwargs, sample.dtype)
        # the encoder, collecting a residual after conv_in and after every resnet and downsampler
        hidden = self.conv_in(sample)
        residuals = [hidden]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, outputs = block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
            else:
                hidden, outputs = block(hidden, emb)
            residuals.extend(outputs)
        hidden = self.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
        down = tuple(project(r) for project, r in zip(self.down_projections, residuals, strict=True))
        return GuideOutput(down_block_additional_residuals=down, mid_block_additional_residual=self.mid_projection(hidden))

    def _added_embedding(self, added_cond_kwargs, dtype) -> torch.Tensor:
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
            raise ValueError("this guide fits an SDXL-style UNet: pass added_cond_kwargs with 'text_embeds' and 'time_ids'")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)  # (B, 6 * dim)
        return self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(dtype))


def residual_channels(block_out_channels, layers_per_block: int) -> list[int]:
    """Channels of the UNet's skip connections: conv_in, then each resnet and downsampler of each block."""
    channels = [block_out_channels[0]]
    for i, width in enumerate(block_out_channels):
        is_final = i == len(block_out_channels) - 1
        channels += [width] * (layers_per_block + (0 if is_final else 1))
    return channels


def _per_block(value, block_out_channels) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * len(block_out_channels)
    if len(values) != len(block_out_channels):
        raise ValueError(f"{value} must have one entry per down block ({len(block_out_channels)})")
    return values


def _check_config(block_out_channels, unet_block_out_channels, down_block_types, norm_num_groups, heads) -> None:
    if not len(block_out_channels) == len(unet_block_out_channels) == len(down_block_types):
        raise ValueError(f"block_out_channels {block_out_channels}, unet_block_out_channels {unet_block_out_channels} and "
                         f"down_block_types {down_block_types} must have one entry per UNet down block")
    for width, head_count in zip(block_out_channels, heads):
        if width % norm_num_groups or width % head_count:
            raise ValueError(f"guide width {width} must be divisible by norm_num_groups={norm_num_groups} and heads={head_count}")
