"""One guided denoising step against one batched-CFG step on the SD1.5 and SDXL UNets, on a GPU, in one run.

    python benchmarks/gpu_speed.py                            # fp16, batch 1 4 8, SD1.5 + SDXL, both guide designs
    python benchmarks/gpu_speed.py --compile                  # the same, every step function torch.compile'd (fullgraph)
    python benchmarks/gpu_speed.py --compile --compile-mode reduce-overhead   # ... and replayed as CUDA graphs
    python benchmarks/gpu_speed.py --device cpu --tiny        # smoke run of the script itself (narrow configs, seconds)

UNets are built from the published configs in pnpguide.evaluation.speed with random weights (speed does not depend
on the weights), each guide with OutputGuide.from_unet(unet) or ResidualGuide.from_unet(unet). For each config and batch B, these
are timed in turns (a, b, c, a, b, c, ...) after warm-up, with CUDA events:
  cfg      one UNet call at batch 2B, combined by cfg_combine (diffusers' batched CFG);
  guided   one UNet call at batch B plus the guide (the output design, then the paper's residual one);
  single   one plain UNet call at batch B (the floor any single-pass method sits on).
Printed per row: median milliseconds, speed-up = cfg / guided, and the FLOPs ceiling 2 x UNet / (UNet + guide),
counted with attention included on the meta device (the most a guided step can gain if time followed FLOPs).
On a machine without a GPU it says so and exits with status 1, unless --device cpu is given.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch._dynamo
from diffusers import UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

from pnpguide.evaluation.speed import SD15, SDXL, step_cost
from pnpguide.guides import OutputGuide, ResidualGuide
from pnpguide.teacher import cfg_noise_pred, guided_noise_pred

CONFIGS = {"sd15": SD15, "sdxl": SDXL}
KINDS = {"output": OutputGuide, "residual": ResidualGuide}  # the guide designs, by name
TOKENS = 77


def tiny_config(config: dict) -> dict:
    """The same block layout at a few channels and an 8x8 latent: for a smoke run, not for timing."""
    small = dict(config, sample_size=8, block_out_channels=tuple(32 * (1 + i // 2) for i in range(len(config["block_out_channels"]))),
                 cross_attention_dim=32, attention_head_dim=2, transformer_layers_per_block=1, norm_num_groups=16)
    if config.get("addition_embed_type") == "text_time":
        small.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    return small


def step_inputs(config: dict, batch: int, device, dtype, tokens: int) -> dict:
    """Random latents, prompt embeddings and (SDXL) added conditioning for one step at batch B."""
    size, width = config["sample_size"], config["cross_attention_dim"]
    inputs = {
        "sample": torch.randn(batch, 4, size, size, device=device, dtype=dtype),
        "timestep": torch.full((batch,), 500, device=device),
        "prompt_embeds": torch.randn(batch, tokens, width, device=device, dtype=dtype),
        "added": None,
    }
    if config.get("addition_embed_type") == "text_time":
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added"] = {"text_embeds": torch.randn(batch, text_dim, device=device, dtype=dtype),
                           "time_ids": torch.randn(batch, 6, device=device, dtype=dtype)}
    return inputs


def step_functions(unet, guides: dict, inputs: dict, compile_mode: str | None) -> dict:
    """name -> a no-argument function running one denoising step's model call(s), compiled with `compile_mode`
    (None: eager)."""
    x, t, c, added = inputs["sample"], inputs["timestep"], inputs["prompt_embeds"], inputs["added"]
    doubled = None if added is None else {k: torch.cat([v, v]) for k, v in added.items()}
    fns = {
        "cfg": lambda: cfg_noise_pred(unet, x, t, c, c, 7.5, added_cond_kwargs=doubled),
        "single": lambda: unet(x, t, encoder_hidden_states=c, added_cond_kwargs=added, return_dict=False)[0],
    }
    for kind, guide in guides.items():
        fns[f"guided:{kind}"] = lambda guide=guide: guided_noise_pred(unet, guide, x, t, c, 7.5, added_cond_kwargs=added)
    if compile_mode is not None:
        torch._dynamo.reset()  # one set of graphs per config and batch: the lambdas share code objects across them
        backend = "eager" if unet.device.type == "cpu" else "inductor"  # on a CPU: check the graphs, skip minutes of C++ builds
        fns = {name: torch.compile(fn, fullgraph=True, mode=None if backend == "eager" else compile_mode, backend=backend) for name, fn in fns.items()}
    return fns


def time_in_turns(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds of each function, timed in turns after `warmup` rounds: CUDA events on a GPU (one
    synchronisation per round, none between the events), perf_counter on the CPU."""
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            if device.type == "cuda":
                events = {name: (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for name in fns}
                for name, fn in fns.items():
                    events[name][0].record()
                    fn()
                    events[name][1].record()
                torch.cuda.synchronize(device)
                for name, (start, end) in events.items():
                    times[name].append(start.elapsed_time(end))
            else:
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def flops_ceilings(config: dict, tokens: int) -> dict[str, float]:
    """2 x UNet / (UNet + guide) per guide kind, from FLOPs counted on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        guides = {kind: design.from_unet(unet) for kind, design in KINDS.items()}
    return {kind: 1 / step_cost(unet, guide, tokens=tokens, sample_size=config["sample_size"]).ratio for kind, guide in guides.items()}


def benchmark(name: str, config: dict, args, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Table rows for one UNet config, every batch size and guide kind."""
    tokens = 8 if args.tiny else TOKENS
    ceilings = flops_ceilings(config, tokens)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device, dtype).eval()
    guides = {kind: design.from_unet(unet).to(device, dtype).eval() for kind, design in KINDS.items()}
    rows = []
    for batch in args.batch_sizes:
        fns = step_functions(unet, guides, step_inputs(config, batch, device, dtype, tokens), args.compile_mode if args.compile else None)
        ms = time_in_turns(fns, args.repeats, args.warmup, device)
        for kind in KINDS:
            guided = ms[f"guided:{kind}"]
            speedup = ms["cfg"] / guided
            rows.append(f"| {name} | {batch} | {kind} | {ms['cfg']:.2f} | {guided:.2f} | {ms['single']:.2f} | {speedup:.2f}x | "
                        f"{ceilings[kind]:.3f}x | {speedup / ceilings[kind]:.0%} |")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a smoke run (default: cuda)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"), help="(default: float16)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="(default: sd15 sdxl)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8], help="(default: 1 4 8)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (default: 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default: 5; with --compile they compile)")
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) every step function first")
    parser.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"),
                        help="torch.compile mode; reduce-overhead adds CUDA graphs, which small, launch-bound batches need (default: default)")
    parser.add_argument("--tiny", action="store_true", help="narrow configs at 8x8 latents: checks the script runs, times nothing useful")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" after every .to(dtype)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_speed: no CUDA GPU on this machine, nothing timed (for a smoke run of the script: --device cpu --tiny)")
        return 1
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{where}, {args.dtype}, torch {torch.__version__}, compile={args.compile_mode if args.compile else False}, median of {args.repeats} rounds in turns "
          f"after {args.warmup} warm-up rounds{', TINY configs (smoke run)' if args.tiny else ''}\n")
    print("| UNet | batch | guide design | CFG step ms | guided step ms | plain UNet ms | speed-up | FLOPs ceiling | share of ceiling |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        config = tiny_config(CONFIGS[name]) if args.tiny else CONFIGS[name]
        for row in benchmark(name, config, args, device, dtype):
            print(row, flush=True)
    print("\nspeed-up = CFG step / guided step; FLOPs ceiling = 2 UNet / (UNet + guide), counted with attention.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
