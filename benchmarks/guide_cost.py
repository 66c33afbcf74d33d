"""Compute and speed of the guided student vs diffusers' batched CFG, measured in one run.

    python benchmarks/guide_cost.py                       # CPU: FLOPs for all, wall time on the embedded model
    python benchmarks/guide_cost.py --device cuda          # GPU: wall time on SD1.5 / SDXL configs too

FLOPs are counted with attention included (plain matmul attention; FlopCounterMode counts 0 for CPU
SDPA) on meta tensors for the big configs, so they cost nothing. SD1.5 / SDXL UNets are built from
their published config values with random weights: timing does not need trained weights.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DConditionModel

from pnpguide.loading import load_pipeline
from pnpguide.evaluation.speed import SD15, SDXL, median_seconds_each, parameter_count, step_cost
from pnpguide.guide import GuideModel
from pnpguide.loading import default_guide_dir, load_guide
from pnpguide.pipeline import PlugAndPlayPipeline
from pnpguide.teacher import cfg_noise_pred, guided_noise_pred

TOKENS = {"sd15": 77, "sdxl": 77}
TABLE_HEADER = (
    "| batch | CFG s/image | guide s/image | one UNet pass s/image | speed-up | ceiling | share of ceiling |\n"
    "|---|---|---|---|---|---|---|"
)
CEILING_NOTE = (
    "ceiling = CFG time / one plain UNet pass (w=1): the most any single-pass method can gain here. Where the\n"
    "batch-2B CFG call costs well under twice the batch-B call (small batches, overhead- or weight-bound), it is < 2."
)


def table_row(batch: int, seconds: dict[str, float]) -> str:
    """One table line from the timings of a whole batch (keys cfg, guided, single), shown per image."""
    cfg, guided, single = (seconds[name] / batch for name in ("cfg", "guided", "single"))
    speedup, ceiling = cfg / guided, cfg / single
    return f"| {batch} | {cfg:.4f} | {guided:.4f} | {single:.4f} | {speedup:.2f}x | {ceiling:.2f}x | {speedup / ceiling:.0%} |"


def compute_table(models: dict[str, UNet2DConditionModel], tokens: dict[str, int]) -> None:
    print("| UNet | UNet params | guide | guide params | params ratio | UNet GFLOPs/step | guide GFLOPs/step | (UNet+guide)/(2 UNet) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, unet in models.items():
        kinds = [(size, reads) for reads in ("latent", "unet_features", "unet_output") for size in ("tiny", "full")]
        for size, reads in kinds:
            with torch.device(unet.device):  # meta for the big configs: FLOPs need shapes only
                guide = GuideModel.from_unet(unet, size, reads=reads)
            cost = step_cost(unet, guide, tokens=tokens[name])
            label = {"latent": size, "unet_features": f"{size}, reads UNet features", "unet_output": f"{size}, reads UNet output"}[reads]
            print(
                f"| {name} | {parameter_count(unet) / 1e6:.1f}M | {label} | {parameter_count(guide) / 1e6:.2f}M | "
                f"{parameter_count(guide) / parameter_count(unet):.4f} | {cost.unet / 1e9:.2f} | {cost.guide / 1e9:.3f} | {cost.ratio:.4f} |"
            )


def time_embedded(device: str, batch_sizes: list[int], steps: int, repeats: int) -> None:
    """Whole pipelines: diffusers' StableDiffusionPipeline (batched CFG) vs PlugAndPlayPipeline (guide)."""
    sd = load_pipeline().to(device)
    pnp = PlugAndPlayPipeline.from_pipe(sd, guide=load_guide(default_guide_dir("tiny")).to(device))
    for pipe in (sd, pnp):
        pipe.set_progress_bar_config(disable=True)
    print(f"\nembedded pipeline, {steps} DDIM steps, w=7.5, device={device}, median of {repeats}, timed in turns")
    print(CEILING_NOTE)
    print(TABLE_HEADER)
    for batch in batch_sizes:
        prompts = ["a red circle above a blue square on a black background"] * batch
        seconds = median_seconds_each(
            {
                "cfg": lambda: sd(prompts, guidance_scale=7.5, num_inference_steps=steps),
                "guided": lambda: pnp(prompts, guidance_scale=7.5, num_inference_steps=steps),
                "single": lambda: sd(prompts, guidance_scale=1.0, num_inference_steps=steps),
            },
            repeats,
        )
        print(table_row(batch, seconds))


@torch.no_grad()
def time_unet_steps(name: str, config: dict, device: str, batch_sizes: list[int], steps: int, repeats: int, tokens: int = 77) -> None:
    """Denoising steps alone (no text encoder, no VAE), fp16 on GPU: CFG's 2B call vs UNet + tiny guide."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    unet = UNet2DConditionModel.from_config(config).to(device, dtype).eval()
    guide = GuideModel.from_unet(unet, "tiny").to(device, dtype).eval()
    print(f"\n{name} UNet, random weights, {steps} steps, device={device}, {dtype}, median of {repeats}, timed in turns")
    print(TABLE_HEADER)
    for batch in batch_sizes:
        size = config["sample_size"]
        x = torch.randn(batch, 4, size, size, device=device, dtype=dtype)
        c = torch.randn(batch, tokens, config["cross_attention_dim"], device=device, dtype=dtype)
        added = _added(config, batch, device, dtype)
        doubled = {k: torch.cat([v, v]) for k, v in added.items()} if added else None

        def cfg():
            for _ in range(steps):
                cfg_noise_pred(unet, x, 500, c, c, 7.5, added_cond_kwargs=doubled)

        def guided():
            for _ in range(steps):
                guided_noise_pred(unet, guide, x, 500, c, 7.5, added_cond_kwargs=added)

        def single():
            for _ in range(steps):
                unet(x, 500, encoder_hidden_states=c, added_cond_kwargs=added)

        seconds = median_seconds_each({"cfg": cfg, "guided": guided, "single": single}, repeats)
        print(table_row(batch, seconds))


def _added(config, batch, device, dtype):
    if config.get("addition_embed_type") != "text_time":
        return None
    text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return {"text_embeds": torch.randn(batch, text_dim, device=device, dtype=dtype), "time_ids": torch.randn(batch, 6, device=device, dtype=dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to time (default: 1 8)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps per timed run (default: 25)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (default: 3)")
    parser.add_argument("--big-timing", action="store_true", help="also time SD1.5/SDXL configs (default: only on cuda)")
    parser.add_argument("--big-configs", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"], help="which big configs to time")
    args = parser.parse_args()

    embedded = load_pipeline()
    with torch.device("meta"):
        big = {"sd15": UNet2DConditionModel(**SD15), "sdxl": UNet2DConditionModel(**SDXL)}
    compute_table({"embedded": embedded.unet} | big, {"embedded": embedded.tokenizer.model_max_length} | TOKENS)
    time_embedded(args.device, args.batch_sizes, args.steps, args.repeats)
    tokens = embedded.tokenizer.model_max_length
    time_unet_steps("embedded", dict(embedded.unet.config), args.device, args.batch_sizes, args.steps, args.repeats, tokens)
    if args.device == "cuda" or args.big_timing:
        for name in args.big_configs:
            time_unet_steps(name, {"sd15": SD15, "sdxl": SDXL}[name], args.device, args.batch_sizes, args.steps, args.repeats, TOKENS[name])


if __name__ == "__main__":
    main()
