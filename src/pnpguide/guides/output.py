"""The output guide: after the UNet, it predicts CFG's own term `cond - uncond` from x_t and the UNet's conditional output.

The step's output is then `cond + (w - 1) * prediction`: CFG's formula with the unconditional pass predicted. The
conditional output already holds the UNet's whole reading of x_t and the prompt, and the correction keeps CFG's form
in w, so a 32-channel network (0.04% of SD1.5's UNet) comes closer to CFG's images than a residual guide 15 times its
size (docs/method.md). Its last convolution is zero-initialised: an untrained guide adds nothing.

A `negative_head` is a second network that cross-attends to the negative prompt alone and predicts what the negative
changes in CFG's term. CFG with a negative n is `n + w * (cond - n)` = `cond + (w - 1) * ((cond - uncond) + (uncond - n))`:
the prompt's head keeps predicting `cond - uncond` as it was trained to, and the negative head adds `uncond - n`, which is
exactly zero for the empty negative. So the head is skipped on rows without a negative (`negative_rows`), and the guide
without a negative is the one it was made from, to the bit.

`step_heads` gives some timesteps a prompt head of their own (the rest share `output_head`). The image gap is not lost
evenly over a first-steps guide's steps: the first step's correction (t = 999) is tens of times larger than the others', so
a small relative error there costs as much in the image as a large one later, and the last guided step's correction is
the one carried to the end (docs/findings.md). A head that serves one timestep spends all its capacity there, at the
same cost per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.utils import BaseOutput
from torch import nn

from .base import GuideModel, per_sample, zero_module
from .base import ModelMixin  # noqa: F401 (diffusers finds a saved pipeline component's loader by this name in its class's module)

WIDTH = 32  # channels of the output network: it reads the UNet's 4-channel output, whatever the UNet's width
HEAD_DIM = 8  # attention head width: a multiple of 8, as fused GPU attention kernels want


@dataclass
class OutputCorrection(BaseOutput):
    """`sample`, (batch, C, h, w): what the guide adds to the UNet's conditional output, `(w - 1) * predicted (cond - uncond)`."""

    sample: torch.Tensor


class OutputGuide(GuideModel):
    """The output design; build one for a UNet with :meth:`from_unet`. The `unet_*` fields record the UNet it serves,
    so plugging it into another fails in one line instead of giving wrong images."""

    @register_to_config
    def __init__(
        self,
        width: int = WIDTH,
        unet_block_out_channels: tuple[int, ...] = (48, 96, 96),
        unet_in_channels: int = 4,
        unet_out_channels: int | None = None,  # None: unet_in_channels
        unet_cross_attention_dim: int = 384,
        layers_per_block: int = 1,  # the UNet's (recorded to check it; the guide does not depend on it)
        addition_embed_type: str | None = None,  # the UNet's ("text_time": SDXL), recorded to refuse the other kind of base
        norm_num_groups: int = 8,
        norm_eps: float = 1e-5,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        negative_head: bool = False,
        trained_guidance_range: tuple[float, float] | None = None,
        trained_text_encoder: str | None = None,
        trained_timesteps: tuple[int, ...] | None = None,
        trained_schedule: dict | None = None,
        default_guidance_interval: tuple[float, float] | None = None,
        trained_first_steps: int | None = None,
        negative_first_steps: int | None = None,
        step_heads: tuple[int, ...] | None = None,
    ):
        super().__init__()
        if width % norm_num_groups or width % HEAD_DIM:
            raise ValueError(f"width {width} must be divisible by norm_num_groups={norm_num_groups} and by {HEAD_DIM}")
        out_channels = unet_out_channels or unet_in_channels
        time_embed_dim = 4 * width
        self.time_proj = Timesteps(width, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(width, time_embed_dim)
        head = lambda: OutputHead(unet_in_channels + out_channels, out_channels, width, time_embed_dim,  # noqa: E731
                                  unet_cross_attention_dim, norm_num_groups, norm_eps)
        self.output_head = head()
        if step_heads:
            self.step_output_heads = nn.ModuleList([head() for _ in step_heads])
        if negative_head:
            self.negative_output_head = head()

    @classmethod
    def from_unet(cls, unet, width: int = WIDTH) -> "OutputGuide":
        """A new (zero) output guide for `unet`."""
        config = unet.config
        if config.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNets with addition_embed_type={config.addition_embed_type!r} are not supported")
        return cls(width=width, unet_block_out_channels=tuple(config.block_out_channels), unet_in_channels=config.in_channels,
                   unet_out_channels=config.out_channels, unet_cross_attention_dim=config.cross_attention_dim,
                   layers_per_block=config.layers_per_block, addition_embed_type=config.addition_embed_type,
                   flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=config.freq_shift)

    @classmethod
    def translated_config(cls, config: dict) -> dict:
        """An older pnpguide's output guide: one width instead of per-block widths, and no fields of other designs."""
        config = super().translated_config(config)
        config["width"] = config.pop("block_out_channels", [WIDTH])[0]
        for other in ("size", "down_block_types", "transformer_layers_per_block", "num_attention_heads", "use_linear_projection",
                      "guidance_embed_dim", "addition_time_embed_dim", "projection_class_embeddings_input_dim", "reads"):
            config.pop(other, None)
        return config

    def with_negative_head(self) -> "OutputGuide":
        """This guide plus a negative head (see the module) that starts as a copy of the prompt's head with its zero output
        convolution left at zero: it reads x_t and the UNet's output as the trained head does from the start, and the guide
        computes what it did until training moves that convolution."""
        if self.config.negative_head:
            return self
        guide = self._grown("negative_output_head.", negative_head=True)
        guide.negative_output_head.load_state_dict(self.output_head.state_dict())
        zero_module(guide.negative_output_head.conv_out)
        return guide

    def with_step_heads(self, timesteps: list[int]) -> "OutputGuide":
        """This guide plus a prompt head of its own for each of `timesteps`, each a copy of the shared head: the guide
        computes what it did until they are trained."""
        timesteps = tuple(sorted({int(t) for t in timesteps}, reverse=True))
        if self.config.step_heads:
            if tuple(self.config.step_heads) == timesteps:
                return self
            raise ValueError(f"this guide already has step heads for t = {list(self.config.step_heads)}; start from a guide without them")
        guide = self._grown("step_output_heads.", step_heads=timesteps)
        for head in guide.step_output_heads:
            head.load_state_dict(self.output_head.state_dict())
        return guide

    def _grown(self, new_modules: str, **config_changes) -> "OutputGuide":
        """This guide with `config_changes`, its weights and carry carried over; only the modules named `new_modules...`
        are new (left as built, for the caller to fill)."""
        config = {key: value for key, value in self.config.items() if not key.startswith("_")}
        guide = type(self).from_config({**config, **config_changes})
        missing, unexpected = guide.load_state_dict(self.state_dict(), strict=False)
        if unexpected or any(not name.startswith(new_modules) for name in missing):
            raise RuntimeError(f"could not carry the guide's weights over: missing {missing}, unexpected {unexpected}")
        guide.correction_carry = self.correction_carry
        return guide.to(device=self.device, dtype=self.dtype)

    def prompt_difference(self, inputs: torch.Tensor, emb: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep) -> torch.Tensor:
        """The prompt's head's `cond - uncond`, each row from the head of its timestep (the shared one where it has none)."""
        if not self.config.step_heads:
            return self.output_head(inputs, emb, encoder_hidden_states)
        heads = [self.output_head, *self.step_output_heads]
        timesteps = per_sample(timestep, len(inputs), inputs.device).round().long()
        owner = (timesteps[:, None] == torch.tensor(self.config.step_heads, device=inputs.device)).long()
        which = (owner * torch.arange(1, len(heads), device=inputs.device)).sum(1)  # 0: the shared head
        chosen = which.unique().tolist()
        if len(chosen) == 1:  # sampling: one timestep per call
            return heads[chosen[0]](inputs, emb, encoder_hidden_states)
        difference = None
        for index in chosen:
            rows = (which == index).nonzero().flatten()
            part = heads[index](inputs[rows], emb[rows], encoder_hidden_states.expand(len(inputs), -1, -1)[rows])
            difference = part.new_zeros(len(inputs), *part.shape[1:]) if difference is None else difference
            difference = difference.index_copy(0, rows, part)
        return difference

    @property
    def reads_negative_prompt(self) -> bool:
        """Whether a negative prompt changes what this guide does (it has a negative head)."""
        return bool(self.config.negative_head)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        guidance_scale: torch.Tensor | float,
        unet_output: torch.Tensor,
        negative_encoder_hidden_states: torch.Tensor | None = None,
        negative_rows: torch.Tensor | None = None,
    ) -> OutputCorrection:
        """sample: (B, C, h, w) noisy latents; encoder_hidden_states: (B, tokens, dim); timestep and guidance_scale:
        scalars or (B,) tensors; unet_output: the UNet's conditional output at this step, (B, C, h, w). A negative head
        reads `negative_encoder_hidden_states` (B or 1 rows; None: no negative) on the rows `negative_rows` marks ((B,)
        bool; None: all)."""
        batch = sample.shape[0]
        w = per_sample(guidance_scale, batch, sample.device, torch.float32)
        emb = self.time_embedding_of(timestep, batch, sample.dtype)
        inputs = torch.cat([sample, unet_output.to(sample.dtype)], dim=1)
        difference = self.prompt_difference(inputs, emb, encoder_hidden_states, timestep)
        if self.config.negative_head and negative_encoder_hidden_states is not None:  # rows without one add exact zeros
            negative = negative_encoder_hidden_states.expand(batch, *negative_encoder_hidden_states.shape[1:]).to(sample.dtype)
            shift = self.negative_output_head(inputs, emb, negative)  # uncond - n: CFG's term with the negative
            if negative_rows is not None:
                shift = shift * negative_rows.to(device=shift.device, dtype=shift.dtype).reshape(-1, 1, 1, 1)
            difference = difference + shift
        return OutputCorrection(sample=difference * (w - 1).to(difference.dtype).reshape(-1, 1, 1, 1))


class OutputHead(nn.Module):
    """Reads [x_t, the UNet's output] and predicts CFG's term `cond - uncond`: a resnet at full resolution, two resnets with
    cross-attention to the prompt at half resolution, then back up, merged with the full-resolution features, one more
    resnet with cross-attention, and a zero-initialised convolution out."""

    def __init__(self, in_channels: int, out_channels: int, width: int, temb_channels: int, cross_attention_dim: int, groups: int, eps: float):
        super().__init__()
        resnet = lambda: ResnetBlock2D(in_channels=width, out_channels=width, temb_channels=temb_channels, groups=groups, eps=eps)  # noqa: E731
        attention = lambda: Transformer2DModel(num_attention_heads=width // HEAD_DIM, attention_head_dim=HEAD_DIM, in_channels=width,  # noqa: E731
                                               cross_attention_dim=cross_attention_dim, norm_num_groups=groups)
        self.conv_in = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.resnet_in = resnet()
        self.downsample = nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1)
        self.low = nn.ModuleList([resnet(), attention(), resnet(), attention()])
        self.upsample = Upsample2D(width, use_conv=True)
        self.merge = nn.Conv2d(2 * width, width, kernel_size=1)
        self.resnet_out, self.attention_out = resnet(), attention()
        self.norm_out = nn.GroupNorm(groups, width, eps=eps)
        self.conv_out = zero_module(nn.Conv2d(width, out_channels, kernel_size=3, padding=1))

    def forward(self, inputs: torch.Tensor, emb: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        full = self.resnet_in(self.conv_in(inputs), emb)
        hidden = self.downsample(full)
        for layer in self.low:
            hidden = self._run(layer, hidden, emb, encoder_hidden_states)
        hidden = self.merge(torch.cat([self.upsample(hidden, output_size=full.shape[-2:]), full], dim=1))
        hidden = self._run(self.attention_out, self.resnet_out(hidden, emb), emb, encoder_hidden_states)
        return self.conv_out(nn.functional.silu(self.norm_out(hidden)))

    @staticmethod
    def _run(layer, hidden, emb, encoder_hidden_states):
        if isinstance(layer, ResnetBlock2D):
            return layer(hidden, emb)
        # return_dict=False: the output class diffusers builds otherwise warns at every call, which torch.compile cannot trace
        return layer(hidden, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
