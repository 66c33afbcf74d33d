"""The guide: a small ControlNet-like encoder that makes one UNet pass behave like classifier-free guidance.

It reads what the UNet reads (noisy latent, timestep, prompt embeddings) plus the guidance scale w, and
returns one residual per UNet skip connection and one for the mid block, through zero-initialised 1x1
convolutions. An untrained guide therefore changes nothing, and the frozen UNet it is trained on, or
any fine-tune of it, stays untouched (Hsiao et al., "Plug-and-Play Diffusion Distillation", CVPR 2024).

Three ways to see the input (`reads`):
- "latent": the paper's design, a narrow copy of the UNet's encoder run on the noisy latent;
- "unet_features": small heads on the frozen UNet's *own* encoder features (its skip connections and
  mid-block output). The UNet computes them anyway and the residuals only enter its decoder, so this
  costs no extra UNet pass, and the guide starts from everything the UNet knows about x_t and the
  prompt instead of re-deriving it at 1/8 of the width (the idea of ControlNet-XS, Zavadski et al. 2024);
- "unet_output": a small network after the UNet, reading x_t and the UNet's conditional output, that predicts
  CFG's own term `cond - uncond`; the step's output is then `cond + (w - 1) * prediction`, CFG's formula with the
  unconditional pass predicted. Its zero-initialised output convolution plays the projections' part. The
  conditional output already holds the UNet's whole reading of x_t and the prompt, and the correction keeps CFG's
  form in w. On the embedded model it comes closer to CFG's images than the residual guides at a fraction of their
  size, but with lower prompt adherence (docs/guides.md, "An output-space guide").
With `scale_by_guidance`, residuals are multiplied by (w - 1): w = 1 is exactly the unguided UNet, and
the correction grows with w as CFG's own `w * (cond - uncond)` term does.

With `reads_negative`, the guide also reads the negative prompt, which CFG puts in place of the empty one: its
cross-attention sees the prompt's tokens followed by the negative's, the latter plus a learned segment embedding
so the two can be told apart. That costs one vector of parameters and a second set of keys and values.
An output guide can instead have a `negative_head`: a second output network that cross-attends to the negative prompt
alone and predicts what the negative changes in CFG's term. CFG with a negative n is `n + w * (cond - n)` =
`cond + (w - 1) * ((cond - uncond) + (uncond - n))`: the prompt's head keeps predicting `cond - uncond` as it was
trained to, and the negative head adds `uncond - n`, which is exactly zero for the empty negative. So the head is
skipped where there is no negative (rows given as `negative_rows`), and the guide without a negative is the one it
was made from, to the bit.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block
from diffusers.utils import BaseOutput
from torch import nn

GUIDE_SIZES = ("tiny", "full")
GUIDE_INPUTS = ("latent", "unet_features", "unet_output")
HEAD_DIM = 8  # attention head width of tiny guides (both kinds): a multiple of 8, as fused GPU attention kernels want
TINY_WIDTH_DIVISOR = 8  # tiny guides are 1/8 of the UNet's width: ~0.6% of SD1.5's parameters
FEATURE_WIDTH_DIVISOR = 16  # tiny feature-reading guides are 1/16 of it: 0.45% of SD1.5's parameters
TINY_MIN_CHANNELS = 16
SHIPPED_GUIDES_DIR = Path(__file__).parent / "assets" / "guides"  # guides for the embedded base, by folder name
OUTPUT_GUIDE_WIDTHS = {"tiny": 32, "full": 128}  # output guides: channels, whatever the UNet (they see its 4-channel output)
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


@dataclass
class OutputCorrection(BaseOutput):
    """What an output guide ("unet_output") returns: `sample`, (batch, C, h, w), to be added to the UNet's output."""

    sample: torch.Tensor


@dataclass
class UNetFeatures:
    """What a "unet_features" guide reads: the frozen UNet's skip connections (conv_in, then every resnet and
    downsampler of its encoder, as `down_block_res_samples`) and its mid-block output, for the current step."""

    skips: tuple[torch.Tensor, ...]
    mid: torch.Tensor


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def residual_channels(block_out_channels, layers_per_block: int) -> list[int]:
    """Channels of the UNet's skip connections: conv_in, then each resnet and downsampler of each block."""
    channels = [block_out_channels[0]]
    for i, width in enumerate(block_out_channels):
        is_final = i == len(block_out_channels) - 1
        channels += [width] * (layers_per_block + (0 if is_final else 1))
    return channels


def _tiny_width(channels: int, divisor: int) -> int:
    return max(TINY_MIN_CHANNELS, math.ceil(channels / divisor / 8) * 8)


class GuideModel(ModelMixin, AttentionMixin, ConfigMixin):
    """ControlNet-like guide for a frozen UNet2DConditionModel; build one with :meth:`from_unet`.

    The `unet_*` arguments record the architecture the guide fits, so plugging it into another UNet
    fails with a clear error instead of silently producing garbage. Training records the range of w it
    saw in `trained_guidance_range`, and step distillation the DDIM step counts it was distilled for
    in `trained_step_counts` (None: any) with the DDIM scheduler config in `trained_schedule`, so the
    pipeline samples on the schedule the guide learnt and warns outside it.
    """

    @register_to_config
    def __init__(
        self,
        size: str = "tiny",
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
        trained_step_counts: tuple[int, ...] | None = None,
        trained_schedule: dict | None = None,
        reads: str = "latent",
        scale_by_guidance: bool = False,
        trained_text_encoder: str | None = None,
        reads_negative: bool = False,
        unet_out_channels: int | None = None,  # an output guide's output (None: unet_in_channels)
        trained_first_steps: int | None = None,  # trained on the first N steps of the teacher's runs only (then carried on)
        negative_head: bool = False,  # an output guide's second head, reading the negative prompt (see the module)
        negative_first_steps: int | None = None,  # its negative head was trained on the first N steps: with a negative, it runs that many before carrying on
        default_guidance_interval: tuple[float, float] | None = None,  # (t_low, t_high) where its guidance was measured to pay: the pipeline's interval when a call gives none
        trained_timesteps: tuple[int, ...] | None = None,  # step-distilled on this explicit grid (descending, one per UNet call; DDIM from each to the next, the last to the end)
    ):
        super().__init__()
        if reads not in GUIDE_INPUTS:
            raise ValueError(f"reads must be one of {GUIDE_INPUTS}, got {reads!r}")
        layers, heads = _per_block(transformer_layers_per_block, block_out_channels), _per_block(num_attention_heads, block_out_channels)
        _check_config(size, block_out_channels, unet_block_out_channels, down_block_types, norm_num_groups, heads)
        width0, time_embed_dim = block_out_channels[0], block_out_channels[0] * 4
        if reads_negative:  # starts at zero: the negative's tokens look like the prompt's until training tells them apart
            self.negative_segment = nn.Parameter(torch.zeros(unet_cross_attention_dim))
        self.time_proj = Timesteps(width0, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(width0, time_embed_dim)
        if negative_head and (reads != "unet_output" or reads_negative):
            raise ValueError(f"negative_head is an output guide's second head (reads 'unet_output', without reads_negative); "
                             f"this guide reads {reads!r}{' and reads_negative' if reads_negative else ''}")
        if reads == "unet_output":  # no w input: CFG's term cond - uncond does not depend on w
            out_channels = unet_out_channels or unet_in_channels
            head = lambda: OutputHead(unet_in_channels + out_channels, out_channels, width0, time_embed_dim,  # noqa: E731
                                      unet_cross_attention_dim, norm_num_groups, norm_eps)
            self.output_head = head()
            if negative_head:
                self.negative_output_head = head()
            return
        self.conv_in = nn.Conv2d(unet_in_channels, width0, kernel_size=3, padding=1)
        self.guidance_proj = Timesteps(guidance_embed_dim, flip_sin_to_cos, freq_shift)
        self.guidance_embedding = TimestepEmbedding(guidance_embed_dim, time_embed_dim)
        if addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type {addition_embed_type!r} is not supported; only 'text_time' (SDXL)")
        if addition_embed_type == "text_time" and reads == "latent":  # SDXL's size/crop conditioning, as its ControlNet
            # reads it (a feature-reading guide gets it through the UNet's own features)
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)

        if reads == "unet_features":
            self._build_heads(block_out_channels, unet_block_out_channels, down_block_types, layers_per_block, time_embed_dim, unet_cross_attention_dim, norm_num_groups, norm_eps)
            return
        self.down_blocks = nn.ModuleList()
        widths_in = (width0,) + tuple(block_out_channels[:-1])
        for i, (block_type, width_in, width) in enumerate(zip(down_block_types, widths_in, block_out_channels, strict=True)):
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    transformer_layers_per_block=layers[i],
                    in_channels=width_in,
                    out_channels=width,
                    temb_channels=time_embed_dim,
                    add_downsample=i < len(block_out_channels) - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=unet_cross_attention_dim,
                    num_attention_heads=heads[i],
                    attention_head_dim=width // heads[i],
                    downsample_padding=1,
                    use_linear_projection=use_linear_projection,
                )
            )
        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=block_out_channels[-1],
            temb_channels=time_embed_dim,
            transformer_layers_per_block=layers[-1],
            resnet_eps=norm_eps,
            resnet_groups=norm_num_groups,
            cross_attention_dim=unet_cross_attention_dim,
            num_attention_heads=heads[-1],
            use_linear_projection=use_linear_projection,
        )
        # Zero-initialised projections from the guide's widths to the UNet's: an untrained guide adds exact zeros.
        pairs = zip(residual_channels(block_out_channels, layers_per_block), residual_channels(unet_block_out_channels, layers_per_block))
        self.down_projections = nn.ModuleList(zero_module(nn.Conv2d(c_in, c_out, 1)) for c_in, c_out in pairs)
        self.mid_projection = zero_module(nn.Conv2d(block_out_channels[-1], unet_block_out_channels[-1], 1))

    def _build_heads(self, widths, unet_widths, block_types, layers_per_block, temb, cross_dim, groups, eps) -> None:
        """One head per UNet skip connection, plus one on the mid-block output. A skip's head is as wide as
        the guide's block at that resolution and cross-attends to the prompt where that block type does."""
        levels = skip_levels(len(widths), layers_per_block)
        channels = residual_channels(unet_widths, layers_per_block)
        attends = ["CrossAttn" in block_types[level] for level in levels]
        self.skip_heads = nn.ModuleList(
            FeatureHead(c, widths[level], temb, cross_dim if attend else None, groups, eps)
            for c, level, attend in zip(channels, levels, attends, strict=True)
        )
        self.mid_head = FeatureHead(unet_widths[-1], widths[-1], temb, cross_dim, groups, eps)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "GuideModel":
        """ModelMixin's `from_pretrained`, which also takes a shipped guide's name (tiny, full, tiny-16step, ...) as
        the CLI's `--guide` does; a name that is neither a folder nor shipped is an error listing the shipped ones."""
        path, shipped = pretrained_model_name_or_path, shipped_guides()
        if Path(path).exists():
            return super().from_pretrained(path, **kwargs)
        if str(path) in shipped:
            return super().from_pretrained(str(shipped[str(path)]), **kwargs)
        listed = f"shipped guides: {', '.join(shipped)}"
        if "/" not in str(path):  # neither a folder nor a Hub id ("owner/name")
            raise FileNotFoundError(f"no guide folder or shipped guide named {str(path)!r} ({listed})")
        try:
            return super().from_pretrained(path, **kwargs)
        except OSError as error:
            raise OSError(f"{' '.join(str(error).split())} ({listed})") from error

    @classmethod
    def from_unet(
        cls,
        unet,
        size: str = "tiny",
        width_divisor: int | None = None,
        guidance_embed_dim: int = 64,
        reads: str = "latent",
        scale_by_guidance: bool = False,
        reads_negative: bool = False,
    ) -> "GuideModel":
        """Build a guide that fits `unet`: `full` is as wide as its encoder (and, reading the latent, starts
        from its weights), `tiny` is 1/`width_divisor` as wide (default: 8 reading the latent, 16 reading
        the UNet's features); reading the UNet's output, `tiny` and `full` are 32 and 128 channels whatever the UNet.
        `reads`, `scale_by_guidance` and `reads_negative`: see the module."""
        config = unet.config
        width_divisor = width_divisor or (FEATURE_WIDTH_DIVISOR if reads == "unet_features" else TINY_WIDTH_DIVISOR)
        if size not in GUIDE_SIZES:
            raise ValueError(f"size must be one of {GUIDE_SIZES}, got {size!r}")
        _check_unet_supported(config)
        full = size == "full" and reads != "unet_output"  # as wide as the UNet's encoder, in its layout
        heads = config.num_attention_heads or config.attention_head_dim  # the UNet's historical naming (diffusers#2011)
        heads = _per_block(heads, config.block_out_channels)
        layers = _per_block(config.transformer_layers_per_block, config.block_out_channels)
        if reads == "unet_output":  # one width for the output network (only the first entry is used)
            widths = (OUTPUT_GUIDE_WIDTHS[size],) * len(config.block_out_channels)
        else:
            widths = tuple(config.block_out_channels) if full else tuple(_tiny_width(c, width_divisor) for c in config.block_out_channels)
        guide = cls(
            size=size,
            block_out_channels=widths,
            unet_block_out_channels=tuple(config.block_out_channels),
            unet_in_channels=config.in_channels,
            unet_cross_attention_dim=config.cross_attention_dim,
            down_block_types=tuple(config.down_block_types) if full else _tiny_block_types(config.down_block_types),
            layers_per_block=config.layers_per_block,
            transformer_layers_per_block=layers if full else (1,) * len(widths),  # tiny: one transformer layer a block
            num_attention_heads=heads if full else tuple(_tiny_heads(w) for w in widths),
            use_linear_projection=config.use_linear_projection,
            norm_num_groups=config.norm_num_groups if full else 8,
            norm_eps=config.norm_eps,
            flip_sin_to_cos=config.flip_sin_to_cos,
            freq_shift=config.freq_shift,
            guidance_embed_dim=guidance_embed_dim,
            addition_embed_type=config.addition_embed_type,
            addition_time_embed_dim=config.addition_time_embed_dim,
            projection_class_embeddings_input_dim=config.projection_class_embeddings_input_dim,
            reads=reads,
            scale_by_guidance=scale_by_guidance,
            reads_negative=reads_negative,
            unet_out_channels=config.out_channels,
        )
        if full and reads == "latent":  # start from the UNet's own encoder, as ControlNet does
            for name in ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block", "add_time_proj", "add_embedding"):
                if hasattr(guide, name) and hasattr(unet, name):
                    getattr(guide, name).load_state_dict(getattr(unet, name).state_dict())
        return guide

    def with_negative_input(self) -> "GuideModel":
        """This guide, reading the negative prompt as well: every trained weight kept, the segment embedding new
        (zero), so a positive-only guide can be trained further on negatives instead of from scratch."""
        if self.config.reads_negative:
            return self
        return self._grown("negative_segment", reads_negative=True)

    def with_negative_head(self) -> "GuideModel":
        """This output guide plus a negative head (see the module) that starts as a copy of the prompt's head, its
        zero output convolution left at zero: it reads x_t and the UNet's output as the trained head does from the start,
        and the guide computes what it did until training moves that convolution."""
        if self.config.negative_head:
            return self
        guide = self._grown("negative_output_head", negative_head=True)
        guide.negative_output_head.load_state_dict(self.output_head.state_dict())
        zero_module(guide.negative_output_head.conv_out)
        return guide

    def widened(self, factor: int, generator: torch.Generator | None = None) -> "GuideModel":
        """This output guide with `factor` times the channels, computing the same function (Net2Net, Chen et al.
        2016), so that a trained guide can grow instead of starting over: each channel is copied `factor` times, the
        weights reading copies split what the original read among them (at random, so the copies can part in
        training), and the group norms keep as many channels a group, whose statistics copies leave unchanged."""
        if not self.reads_unet_output:
            raise ValueError(f"only an output guide (reads 'unet_output') can be widened; this one reads {self.config.reads!r}")
        if factor < 1:
            raise ValueError(f"factor must be a whole number >= 1, got {factor}")
        if self.config.freq_shift != 0:  # the narrow embedding's frequencies are then not among the wide one's
            raise ValueError(f"a guide with freq_shift={self.config.freq_shift} cannot be widened exactly (its timestep frequencies change with width)")
        wide = self._rebuilt(block_out_channels=[c * factor for c in self.config.block_out_channels], norm_num_groups=self.config.norm_num_groups * factor)
        narrow = self.state_dict()
        wide.load_state_dict({name: _widened(name, narrow[name].float(), value.shape, generator) for name, value in wide.state_dict().items()})
        return wide.to(self.device) if self.dtype == wide.dtype else wide.to(device=self.device, dtype=self.dtype)

    def _grown(self, new: str, **changes) -> "GuideModel":
        """This guide rebuilt with `changes` that add the parameters named `new` (left as initialised), every trained
        weight carried over."""
        guide = self._rebuilt(**changes)
        missing, unexpected = guide.load_state_dict(self.state_dict(), strict=False)
        if unexpected or not missing or any(name.split(".")[0] != new for name in missing):
            raise RuntimeError(f"could not carry the guide's weights over: missing {missing}, unexpected {unexpected}")
        return guide.to(device=self.device, dtype=self.dtype)

    def _rebuilt(self, **changes) -> "GuideModel":
        """A new, untrained guide of this one's architecture with `changes` to its config. Without
        `_use_default_values`: diffusers would reset the fields it lists, reads_negative among them for a guide saved
        before the field existed."""
        config = {key: value for key, value in self.config.items() if key != "_use_default_values"}
        return type(self).from_config({**config, **changes})

    def check_compatible(self, unet) -> None:
        """Raise ValueError naming the first architecture value in which `unet` differs from the guide's."""
        problem = unet_mismatch(self.config, unet.config)
        if problem:
            raise ValueError(problem)

    def check_text_encoder(self, text_encoder, text_encoder_2=None) -> None:
        """Raise ValueError when the guide was distilled with other text encoders than these (SDXL: both): the
        prompt embeddings it reads would mean something else, even where their width is the same. A record of
        the first encoder alone is accepted for an SDXL base (the second is then not checked)."""
        trained, this = self.config.trained_text_encoder, text_encoder_signature(text_encoder, text_encoder_2)
        if trained is None and text_encoder is not None and self.config.trained_guidance_range is not None:
            warnings.warn(unrecorded_text_encoder(this))
        if trained is not None and text_encoder is not None and trained not in (this, text_encoder_signature(text_encoder)):
            raise ValueError(f"guide was trained for another base, with text encoder {trained}; this base has {this}: retrain it here (pnpguide distill --base ...)")

    def residual_widths(self) -> tuple[list[int], int]:
        """Channels of the residuals this guide emits: one per UNet skip connection, and the mid block's (a residual
        guide's; an output guide emits none, see `doctor`)."""
        if self.reads_unet_features:
            return [head.proj_out.out_channels for head in self.skip_heads], self.mid_head.proj_out.out_channels
        return [conv.out_channels for conv in self.down_projections], self.mid_projection.out_channels

    @property
    def reads_negative_prompt(self) -> bool:
        """Whether the negative prompt changes what this guide does (`reads_negative` or a `negative_head`)."""
        return bool(self.config.reads_negative or getattr(self.config, "negative_head", False))

    @property
    def reads_unet_features(self) -> bool:
        return self.config.reads == "unet_features"

    @property
    def reads_unet_output(self) -> bool:
        return self.config.reads == "unet_output"

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        guidance_scale: torch.Tensor | float,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        unet_features: UNetFeatures | None = None,
        negative_encoder_hidden_states: torch.Tensor | None = None,
        unet_output: torch.Tensor | None = None,
        negative_rows: torch.Tensor | None = None,
    ) -> GuideOutput | OutputCorrection:
        """sample: (batch, C, h, w) noisy latents; encoder_hidden_states: (batch, tokens, dim);
        timestep and guidance_scale: scalars or (batch,) tensors; `unet_features`: the frozen UNet's encoder
        features at this step, which a "unet_features" guide needs (see `teacher.guided_noise_pred`);
        `negative_encoder_hidden_states`: (batch, tokens', dim), the negative prompt's embeddings (the empty
        prompt's for none), which a guide with `reads_negative` needs and any other ignores; `unet_output`: the
        UNet's conditional output at this step, which a "unet_output" guide reads. A `negative_head` reads the negative
        embeddings where given (None: no negative), on the rows `negative_rows` marks ((batch,) bool; None: all).
        Returns :class:`GuideOutput`, or for a "unet_output" guide :class:`OutputCorrection`."""
        # 1. time and guidance-scale embeddings (the time embedding is cast to the sample's dtype: the
        #    sinusoidal projection is always fp32, and the MLP may run in fp16)
        batch = sample.shape[0]
        timestep = per_sample(timestep, batch, sample.device)
        w = per_sample(guidance_scale, batch, sample.device, torch.float32)
        emb = self.time_embedding(self.time_proj(timestep).to(sample.dtype))
        encoder_hidden_states = self._context(encoder_hidden_states, negative_encoder_hidden_states)
        if self.reads_unet_output:
            return self._correct_output(sample, unet_output, emb, encoder_hidden_states, w, negative_encoder_hidden_states, negative_rows)
        emb = emb + self.guidance_embedding(self.guidance_proj(w * W_EMBED_SCALE).to(sample.dtype))
        if self.reads_unet_features:
            output = self._read_features(unet_features, emb, encoder_hidden_states)
        else:
            if self.config.addition_embed_type == "text_time":
                emb = emb + self._added_embedding(added_cond_kwargs, sample.dtype)
            output = self._encode(sample, emb, encoder_hidden_states)
        return _scaled(output, w - 1) if self.config.scale_by_guidance else output

    def _context(self, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None) -> torch.Tensor:
        """The tokens the guide cross-attends to: the prompt's, then (`reads_negative`) the negative's, marked."""
        if not self.config.reads_negative:
            return prompt_embeds
        if negative_embeds is None:
            raise ValueError("this guide reads the negative prompt: pass negative_encoder_hidden_states (the empty prompt's embeddings for none)")
        negative_embeds = negative_embeds.expand(len(prompt_embeds), *negative_embeds.shape[1:])  # one row serves a batch
        return torch.cat([prompt_embeds, negative_embeds + self.negative_segment.to(negative_embeds.dtype)], dim=1)

    def _correct_output(self, sample, unet_output, emb, encoder_hidden_states, w, negative_embeds, negative_rows) -> OutputCorrection:
        if unet_output is None:
            raise ValueError("this guide reads the UNet's output: call it through pnpguide.guided_noise_pred (or pass unet_output)")
        inputs = torch.cat([sample, unet_output.to(sample.dtype)], dim=1)
        difference = self.output_head(inputs, emb, encoder_hidden_states)
        if self.config.negative_head and negative_embeds is not None:  # (rows without a negative add exact zeros: no host sync to check)
            negative_embeds = negative_embeds.expand(len(sample), *negative_embeds.shape[1:])  # one row serves a batch
            shift = self.negative_output_head(inputs, emb, negative_embeds.to(sample.dtype))  # uncond - n: CFG's term with the negative
            if negative_rows is not None:
                shift = shift * negative_rows.to(device=shift.device, dtype=shift.dtype).reshape(-1, 1, 1, 1)
            difference = difference + shift
        return OutputCorrection(sample=difference * (w - 1).to(difference.dtype).reshape(-1, 1, 1, 1))

    def _read_features(self, features: UNetFeatures | None, emb, encoder_hidden_states) -> GuideOutput:
        if features is None:
            raise ValueError("this guide reads the UNet's features: call it through pnpguide.guided_noise_pred (or pass unet_features)")
        if len(features.skips) != len(self.skip_heads):
            raise ValueError(f"the guide reads {len(self.skip_heads)} skip connections, this UNet has {len(features.skips)}")
        down = tuple(head(skip, emb, encoder_hidden_states) for head, skip in zip(self.skip_heads, features.skips))
        return GuideOutput(down_block_additional_residuals=down, mid_block_additional_residual=self.mid_head(features.mid, emb, encoder_hidden_states))

    def _encode(self, sample, emb, encoder_hidden_states) -> GuideOutput:
        # 2. encoder, collecting a residual after conv_in and after every resnet and downsampler
        hidden = self.conv_in(sample)
        residuals = [hidden]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, outputs = block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
            else:
                hidden, outputs = block(hidden, emb)
            residuals.extend(outputs)
        hidden = self.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
        # 3. zero-initialised projections to the UNet's widths
        down = tuple(project(r) for project, r in zip(self.down_projections, residuals, strict=True))
        return GuideOutput(down_block_additional_residuals=down, mid_block_additional_residual=self.mid_projection(hidden))

    def _added_embedding(self, added_cond_kwargs, dtype) -> torch.Tensor:
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
            raise ValueError("this guide fits an SDXL-style UNet: pass added_cond_kwargs with 'text_embeds' and 'time_ids'")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)  # (B, 6 * dim)
        return self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(dtype))


class FeatureHead(nn.Module):
    """Reads one UNet feature map and returns a correction for it: 1x1 down to the head's width, a resnet
    conditioned on (t, w), cross-attention to the prompt where the UNet attends at that resolution, and a
    zero-initialised 1x1 back to the UNet's width (so an untrained head adds exact zeros)."""

    def __init__(self, channels: int, width: int, temb_channels: int, cross_attention_dim: int | None, groups: int, eps: float):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, width, 1)
        self.resnet = ResnetBlock2D(in_channels=width, out_channels=width, temb_channels=temb_channels, groups=groups, eps=eps)
        self.attention = None
        if cross_attention_dim is not None:
            self.attention = Transformer2DModel(
                num_attention_heads=width // HEAD_DIM, attention_head_dim=HEAD_DIM, in_channels=width,
                cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
            )
        self.proj_out = zero_module(nn.Conv2d(width, channels, 1))

    def forward(self, feature: torch.Tensor, emb: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = self.resnet(self.proj_in(feature), emb)
        if self.attention is not None:
            # return_dict=False: the output class diffusers builds otherwise warns (a FutureWarning) at every call,
            # which torch.compile cannot trace
            hidden = self.attention(hidden, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        return self.proj_out(hidden)


class OutputHead(nn.Module):
    """An output guide's network: reads [x_t, the UNet's output] and predicts CFG's term `cond - uncond`. A resnet at
    full resolution, two resnets with cross-attention to the prompt at half resolution, then back up, merged with the
    full-resolution features, one more resnet with cross-attention, and a zero-initialised convolution out."""

    def __init__(self, in_channels: int, out_channels: int, width: int, temb_channels: int, cross_attention_dim: int, groups: int, eps: float):
        super().__init__()
        resnet = lambda: ResnetBlock2D(in_channels=width, out_channels=width, temb_channels=temb_channels, groups=groups, eps=eps)  # noqa: E731
        attention = lambda: Transformer2DModel(num_attention_heads=width // HEAD_DIM, attention_head_dim=HEAD_DIM, in_channels=width,  # noqa: E731
                                               cross_attention_dim=cross_attention_dim, norm_num_groups=groups)
        self.conv_in = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.resnet_in = resnet()
        self.downsample = nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1)  # Downsample2D's conv, without its alias name
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
        return layer(hidden, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


UNET_KINDS = {None: "an SD 1.x/2.x UNet (no added conditioning)", "text_time": "an SDXL UNet (text_time size/crop conditioning)"}


def conditioning_mismatch(guide_config, unet_config) -> str | None:
    """An SDXL guide on an SD 1.x/2.x UNet or the reverse, in words (None: the same kind): the guide reads, or
    lacks, SDXL's pooled-prompt and size/crop embedding, so nothing else about it can fit."""
    guide_kind, unet_kind = guide_config.get("addition_embed_type"), unet_config.get("addition_embed_type")
    if guide_kind == unet_kind:
        return None
    described = lambda kind: UNET_KINDS.get(kind, f"a UNet with addition_embed_type={kind!r}")  # noqa: E731
    return f"guide built for {described(guide_kind)}, this base has {described(unet_kind)}; use a guide distilled on this base (pnpguide distill --base ...)"


def unet_mismatch(guide_config, unet_config) -> str | None:
    """The first architecture value in which a UNet config differs from the one a guide config was built for, in
    words (None: they fit). Mappings, so a preflight can compare two config.json files before loading weights."""
    kind_problem = conditioning_mismatch(guide_config, unet_config)
    if kind_problem:
        return kind_problem
    expected = {
        "in_channels": (guide_config.get("unet_in_channels"), unet_config.get("in_channels")),
        "cross_attention_dim": (guide_config.get("unet_cross_attention_dim"), unet_config.get("cross_attention_dim")),
        "block_out_channels": (tuple(guide_config.get("unet_block_out_channels")), tuple(unet_config.get("block_out_channels"))),
        "layers_per_block": (guide_config.get("layers_per_block"), unet_config.get("layers_per_block")),
    }
    for name, (ours, theirs) in expected.items():
        if ours != theirs:
            return f"guide built for {name}={ours}, this UNet has {theirs}; retrain or pick the matching guide"
    return None


def shipped_guides() -> dict[str, Path]:
    """The guides shipped for the embedded base, by name: tiny, full, and the step-distilled ones."""
    if not SHIPPED_GUIDES_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(SHIPPED_GUIDES_DIR.iterdir()) if (p / "config.json").is_file()}


def unrecorded_text_encoder(this: str) -> str:
    """Why a trained guide that does not record its text encoder cannot be checked against this base's (one line)."""
    return (f"this guide does not record the text encoder it was trained with, so it cannot be checked against this base's "
            f"({this}); guides made before pnpguide recorded it (its own embedded guides before the 3-layer base, trained "
            f"for MiniLM with 6 layers) give wrong images on another base: retrain it here (pnpguide distill --base ...)")


def text_encoder_signature(text_encoder, text_encoder_2=None) -> str | None:
    """A text encoder's architecture in words, recorded in a guide at training time: 'BertModel (6 layers, 384 wide,
    vocab 30522)'; with SDXL's second encoder, both joined by ' + '."""
    if text_encoder is None:
        return None
    config = text_encoder.config
    words = f"{type(text_encoder).__name__} ({config.num_hidden_layers} layers, {config.hidden_size} wide, vocab {config.vocab_size})"
    return words if text_encoder_2 is None else f"{words} + {text_encoder_signature(text_encoder_2)}"


def skip_levels(num_blocks: int, layers_per_block: int) -> list[int]:
    """The resolution level (down block index) of each UNet skip connection, in `residual_channels` order:
    conv_in is at level 0, a block's resnets at its own level, its downsampler at the next one."""
    levels = [0]
    for i in range(num_blocks):
        levels += [i] * layers_per_block + ([i + 1] if i < num_blocks - 1 else [])
    return levels


# GuideModel.widened: tensors whose widened dimension is two blocks side by side, each copied on its own
CHUNKED_OUTPUTS = ("ff.net.0.proj.",)  # GEGLU's projection: [hidden, gate] along its outputs
CHUNKED_INPUTS = ("output_head.merge.weight",)  # [upsampled, full-resolution features] along its inputs
SINUSOID_INPUT = "time_embedding.linear_1.weight"  # reads Timesteps(width): [cos, sin] of width / 2 frequencies each


def _widened(name: str, tensor: torch.Tensor, shape: torch.Size, generator: torch.Generator | None) -> torch.Tensor:
    """One parameter of `GuideModel.widened`: along dimension 0 (what it computes) channels are copied; along
    dimension 1 (what it reads) each original weight is split among the copies of its input, in random shares."""
    if tensor.ndim > 0 and shape[0] != tensor.shape[0]:
        tensor = tensor[_copy_index(tensor.shape[0], shape[0], 2 if any(key in name for key in CHUNKED_OUTPUTS) else 1)]
    if tensor.ndim < 2 or shape[1] == tensor.shape[1]:
        return tensor
    if name.endswith(SINUSOID_INPUT):
        return _sinusoid_columns(tensor, shape[1])
    index = _copy_index(tensor.shape[1], shape[1], 2 if name in CHUNKED_INPUTS else 1)
    shares = 0.5 + torch.rand((tensor.shape[0], shape[1], *tensor.shape[2:]), generator=generator)
    totals = torch.zeros_like(tensor).index_add_(1, index, shares)
    return tensor[:, index] * shares / totals[:, index]


def _copy_index(narrow: int, wide: int, chunks: int) -> torch.Tensor:
    """For each of `wide` channels, the one of `narrow` it copies; `chunks` blocks side by side are widened each."""
    wide_chunk, narrow_chunk = wide // chunks, narrow // chunks
    channel = torch.arange(wide)
    return channel // wide_chunk * narrow_chunk + channel % wide_chunk % narrow_chunk


def _sinusoid_columns(weight: torch.Tensor, wide: int) -> torch.Tensor:
    """A wider Timesteps embedding has every frequency of the narrow one at every `factor`-th place (frequency i of n/2
    is i / (n/2) along the same log scale), so those columns take the old weights and the new frequencies start at zero."""
    half, wide_half = weight.shape[1] // 2, wide // 2
    columns = torch.arange(half) * (wide_half // half)
    out = weight.new_zeros(weight.shape[0], wide)
    out[:, columns], out[:, wide_half + columns] = weight[:, :half], weight[:, half:]
    return out


def per_sample(value: torch.Tensor | float | int, batch: int, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A scalar or (batch,) value as a (batch,) tensor on `device`. A Python number is filled in on the device
    (`torch.full`) rather than copied from the host (`torch.as_tensor`), which on a GPU would wait at every step."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype or value.dtype).reshape(-1).expand(batch)
    return torch.full((batch,), value, device=device, dtype=dtype or (torch.int64 if isinstance(value, int) else torch.float32))


def _scaled(output: GuideOutput, factor: torch.Tensor) -> GuideOutput:
    """Every residual times a per-sample factor of shape (batch,)."""
    scale = lambda r: r * factor.to(r.dtype).reshape(-1, 1, 1, 1)  # noqa: E731
    return GuideOutput(tuple(scale(r) for r in output.down_block_additional_residuals), scale(output.mid_block_additional_residual))


def _per_block(value, block_out_channels) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * len(block_out_channels)
    if len(values) != len(block_out_channels):
        raise ValueError(f"{value} must have one entry per down block ({len(block_out_channels)})")
    return values


def _tiny_block_types(block_types) -> tuple[str, ...]:
    """No attention at the highest resolution: there, attention's cost grows with tokens squared,
    not with width, and would dominate a tiny guide's FLOPs (~half of them on SD1.5)."""
    return ("DownBlock2D",) + tuple(block_types[1:])


def _tiny_heads(width: int) -> int:
    """Heads HEAD_DIM wide, as a feature guide's: fused GPU attention kernels want head widths that are multiples of
    8, which the UNet's head count does not give at 1/8 of its width (SD1.5: 40 / 8 heads = 5). Attention's FLOPs
    depend on the total width, not on how it is split, so the compute budget is unchanged."""
    return width // HEAD_DIM


def _check_unet_supported(config) -> None:
    if config.mid_block_type not in (None, "UNetMidBlock2DCrossAttn"):
        raise ValueError(f"UNets with mid_block_type={config.mid_block_type!r} are not supported")
    if config.addition_embed_type not in (None, "text_time"):
        raise ValueError(f"UNets with addition_embed_type={config.addition_embed_type!r} are not supported")


def _check_config(size, block_out_channels, unet_block_out_channels, down_block_types, norm_num_groups, heads) -> None:
    if size not in GUIDE_SIZES:
        raise ValueError(f"size must be one of {GUIDE_SIZES}, got {size!r}")
    if not len(block_out_channels) == len(unet_block_out_channels) == len(down_block_types):
        raise ValueError(
            f"block_out_channels {block_out_channels}, unet_block_out_channels {unet_block_out_channels} and "
            f"down_block_types {down_block_types} must have one entry per UNet down block"
        )
    for width, head_count in zip(block_out_channels, heads):
        if width % norm_num_groups or width % head_count:
            raise ValueError(f"guide width {width} must be divisible by norm_num_groups={norm_num_groups} and heads={head_count}")
