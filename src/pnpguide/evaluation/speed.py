"""Compute and speed: parameters, FLOPs (attention counted), UNet evaluations and wall time per image."""

from __future__ import annotations

import ctypes
import functools
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

from ..teacher import cfg_noise_pred, guided_noise_pred

# UNet2DConditionModel configs of SD1.5 and SDXL, from their published config values: the budgets (guide <= 1% of
# SD1.5's parameters, FLOPs ratio <= 0.505) are measured on these, with random weights on the meta device.
SD15 = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)


@contextmanager
def plain_attention(*models):
    """Swap SDPA for diffusers' matmul attention: FlopCounterMode counts 0 FLOPs for CPU SDPA."""
    saved = [m.attn_processors for m in models]
    for m in models:
        m.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:
        for m, processors in zip(models, saved):
            m.set_attn_processor(processors)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@dataclass(frozen=True)
class StepCost:
    """FLOPs of one denoising step for one image."""

    unet: int  # one UNet evaluation at batch 1
    guide: int  # one guide evaluation at batch 1
    tokens: int

    @property
    def cfg(self) -> int:
        return 2 * self.unet

    @property
    def guided(self) -> int:
        return self.unet + self.guide

    @property
    def ratio(self) -> float:
        """(UNet + guide) / (2 x UNet): the paper's headline compute saving."""
        return self.guided / self.cfg

    def sampling_ratio(self, steps: int, guided_steps: int) -> float:
        """A sampling run's FLOPs over CFG's when the guide runs at `guided_steps` of `steps` one-pass steps (an output
        guide whose correction is carried on after its first steps): the guide's cost is spread over the run."""
        return (steps * self.unet + guided_steps * self.guide) / (steps * self.cfg)


@torch.no_grad()
def step_cost(unet, guide, tokens: int | None = None, sample_size: int | None = None) -> StepCost:
    """Count FLOPs of the CFG teacher and the guided student for one image and step (attention counted).

    With `guide=None` only the UNet is counted (`StepCost.guide` is 0)."""
    size = sample_size or unet.config.sample_size
    tokens = tokens or 77
    param = next(unet.parameters())
    sample = torch.randn(1, unet.config.in_channels, size, size, dtype=param.dtype, device=param.device)
    embeds = torch.randn(1, tokens, unet.config.cross_attention_dim, dtype=param.dtype, device=param.device)
    t = torch.tensor([500], device=param.device)
    added = _sdxl_conditioning(unet, param)
    doubled = {k: torch.cat([v, v]) for k, v in added.items()} if added else None
    with plain_attention(*[m for m in (unet, guide) if m is not None]):
        unet_flops = count_flops(lambda: unet(sample, t, embeds, added_cond_kwargs=added))
        both = unet_flops if guide is None else count_flops(lambda: guided_noise_pred(unet, guide, sample, t, embeds, 5.0, added_cond_kwargs=added))
        teacher = count_flops(lambda: cfg_noise_pred(unet, sample, t, embeds, embeds, 5.0, added_cond_kwargs=doubled))
    assert abs(teacher - 2 * unet_flops) <= 0.01 * teacher, "the teacher should cost two UNet evaluations"
    return StepCost(unet=unet_flops, guide=both - unet_flops, tokens=tokens)


def _sdxl_conditioning(unet, like: torch.Tensor) -> dict | None:
    """Random pooled-text and size/crop conditioning for SDXL-style UNets (`addition_embed_type="text_time"`)."""
    config = unet.config
    if config.addition_embed_type != "text_time":
        return None
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {
        "text_embeds": torch.randn(1, text_dim, dtype=like.dtype, device=like.device),
        "time_ids": torch.randn(1, 6, dtype=like.dtype, device=like.device),
    }


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class UNetCallCounter:
    """Counts UNet forward calls and the images they processed (a 2B CFG batch counts 2B)."""

    def __init__(self, unet):
        self.calls = self.images = 0
        self.counting = True  # off while evaluation makes calls that are not the method's cost
        self._handle = unet.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.counting:
            self.calls += 1
            self.images += args[0].shape[0]

    @contextmanager
    def paused(self):
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    def close(self):
        self._handle.remove()


def median_seconds(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` after warm-up runs."""
    return median_seconds_each({"fn": fn}, repeats, warmup)["fn"]


def median_seconds_each(fns: dict, repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, timed in turns (a, b, a, b, ...) after warm-up runs.

    Taking turns spreads any drift in the machine's speed (other jobs, clocks) over all of them alike, so the
    ratios between the results, which are what speed-ups are, stay fair."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory_bytes(fn) -> int:
    """Memory `fn()` needs above what was in use before it: CUDA's allocator peak, or on the CPU the peak of
    the C heap in use (glibc's mallinfo2, where torch's CPU tensors live) sampled every 2 ms; 0 where neither exists."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = _heap_bytes()
    peak, done = [before], threading.Event()

    def watch():  # torch releases the GIL inside its kernels, so this thread gets to sample during them
        while not done.is_set():
            peak[0] = max(peak[0], _heap_bytes())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return max(peak[0] - before, 0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _mallinfo2():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc.mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None


def _heap_bytes() -> int:
    """Bytes malloc has handed out and not got back (small blocks + mmapped ones)."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return 0
    info = mallinfo2()
    return info.uordblks + info.hblkhd
