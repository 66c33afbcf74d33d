"""Whole sampling calls on a GPU: diffusers' CFG against pnpguide's recommended guide and the other paths, in one run.

    python benchmarks/speed.py                               # SD1.5 at 512 px and SDXL at 1024 px, fp16, eager and compiled
    python benchmarks/speed.py --models sd15 --batch-sizes 1 8 --no-compile
    python benchmarks/speed.py --training                    # also the training rates of the recommended recipe at 512 px
    python benchmarks/speed.py --device cpu --tiny           # smoke run of the script itself (narrow models, seconds)

Every row is a whole `pipe(prompts, ...)` call (text encoders, 25 steps, VAE decode), timed in turns (a, b, c, ..., a, b, c)
after a warm-up call, with the GPU synchronised around each call. The models are built from the published SD1.5 / SDXL
configs with random weights (speed does not depend on the weights; a CLIP tokenizer is written with a tiny vocabulary,
prompts are padded to 77 tokens as always). The guides are random too, with the policies the shipped ones record:
- `cfg`: diffusers' own StableDiffusion(XL)Pipeline, 25 steps, guidance_scale 7.5 (two UNet passes per step, batched);
- `default guide`: the recommended output guide, the guide at the first 5 of 25 steps and its correction carried after;
- `paper guide`: the paper's residual guide at every step;
- `cfg + carry`: the training-free path, CFG for 5 steps then its correction carried (no guide); it stands for Adaptive
  Guidance 0.995 + carry too, whose stopping step depends on the model's outputs (random weights have none to give)
  and which measured 31 of CFG's 50 passes on the embedded model, carry 5-6's cost;
- `8-step guide`, `4-step guide`: step-distilled output guides on their own grids, guiding only at t >= 500;
- `single pass`: the UNet alone at w = 1, 25 steps: the ceiling of any one-pass method.
Printed per row: ms per image, speed-up = CFG's time / the row's, and the share of the ceiling = speed-up / (CFG / single pass).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pnpguide import CorrectionCarry, GuidancePolicy, OutputGuide, PlugAndPlayPipeline, PlugAndPlayXLPipeline, ResidualGuide
from pnpguide.evaluation.speed import SD15, SDXL
from pnpguide.guides.base import text_encoder_signature

STEPS, FULL_STEPS, W = 25, 5, 7.5  # the recommended guide's policy: 25 steps, the first 5 guided
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280)
PROMPTS = ["a photo of a cat on a red car", "a watercolour of a lighthouse at dawn"]


def tiny_unet_config(config: dict) -> dict:
    """The same block layout at a few channels and an 8x8 latent: for a smoke run, not for timing."""
    small = dict(config, sample_size=8, block_out_channels=tuple(32 * (1 + i // 2) for i in range(len(config["block_out_channels"]))),
                 cross_attention_dim=64 if config.get("addition_embed_type") else 32, attention_head_dim=2, transformer_layers_per_block=1,
                 norm_num_groups=16)
    if config.get("addition_embed_type") == "text_time":
        small.update(addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    return small


def tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer with a vocabulary of letters (no download): prompts still pad to CLIP's 77 tokens."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789,.":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def text_encoder(kind, dims: dict, vocab: int, tiny: bool):
    dims = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32) if tiny else dims
    return kind(CLIPTextConfig(vocab_size=vocab, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, **dims))


def build(model: str, tiny: bool, device, dtype, workdir: Path):
    """diffusers' pipeline for `model` ("sd15" or "sdxl") with random weights, on `device` in `dtype`."""
    unet_config = tiny_unet_config(SD15 if model == "sd15" else SDXL) if tiny else (SD15 if model == "sd15" else SDXL)
    vae_config = dict(SD15_VAE, block_out_channels=(8, 8, 16, 16), norm_num_groups=4, sample_size=64) if tiny else SD15_VAE
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="trailing")
    tok = tokenizer(workdir / model)
    parts = dict(unet=UNet2DConditionModel(**unet_config), vae=AutoencoderKL(**vae_config), tokenizer=tok, scheduler=scheduler,
                 text_encoder=text_encoder(CLIPTextModel, CLIP_L, len(tok), tiny))
    if model == "sd15":
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        encoder_2 = text_encoder(CLIPTextModelWithProjection, CLIP_G, len(tok), tiny)
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=encoder_2, tokenizer_2=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def guides(unet, timesteps: list[int], scheduler_config: dict, text_encoders: str | None = None) -> dict:
    """The guides, random, with the policies the shipped ones record (a carry with plausible factors, an 8-step grid),
    recorded as trained with this pipeline's text encoders (`text_encoders`: their signature) as a distilled guide is."""
    torch.manual_seed(0)
    full_steps = min(FULL_STEPS, len(timesteps))
    default = OutputGuide.from_unet(unet)
    default.register_to_config(trained_first_steps=full_steps, trained_guidance_range=(2.0, 9.0))
    default.correction_carry = CorrectionCarry(full_steps, [float(t) for t in timesteps], [1.0] + [0.95] * (len(timesteps) - 1))
    eight, four = few_step_guide(unet, 8, scheduler_config), few_step_guide(unet, 4, scheduler_config)
    paper = ResidualGuide.from_unet(unet)
    for guide in (default, eight, four, paper):
        guide.register_to_config(trained_text_encoder=text_encoders)
        for p in guide.parameters():
            torch.nn.init.normal_(p, std=0.02)
    return {"default": default, "8-step": eight, "4-step": four, "paper": paper}


def few_step_guide(unet, steps: int, scheduler_config: dict) -> OutputGuide:
    """A step-distilled guide's policy: its own DDIM grid of `steps` calls, guidance at t >= 500 (what its cost depends on)."""
    guide = OutputGuide.from_unet(unet)
    grid = DDIMScheduler.from_config(scheduler_config)
    grid.set_timesteps(steps)
    guide.register_to_config(trained_timesteps=tuple(int(t) for t in grid.timesteps), trained_schedule=dict(scheduler_config),
                             default_guidance_interval=(500, 1000), trained_guidance_range=(2.0, 9.0))
    return guide


def methods(sd, device, dtype, steps: int = STEPS) -> dict:
    """name -> a function that makes one whole sampling call for a list of prompts."""
    twin = PlugAndPlayXLPipeline if isinstance(sd, StableDiffusionXLPipeline) else PlugAndPlayPipeline
    sd.scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in sd.scheduler.timesteps]
    config = {k: v for k, v in sd.scheduler.config.items() if not k.startswith("_")}
    made = {name: guide.to(device=device, dtype=dtype) for name, guide in guides(sd.unet, timesteps, config, text_encoder_signature(sd.text_encoder, getattr(sd, "text_encoder_2", None))).items()}
    pipes = {name: twin.from_pipe(sd, guide=guide) for name, guide in made.items()}
    plain = twin.from_pipe(sd)
    for pipe in (*pipes.values(), plain):
        pipe.set_progress_bar_config(disable=True)
    carry = GuidancePolicy(carry=made["default"].correction_carry)
    return {
        "cfg": lambda prompts: sd(prompts, num_inference_steps=steps, guidance_scale=W, output_type="np"),
        "default guide": lambda prompts: pipes["default"](prompts, guidance_scale=W, output_type="np"),
        "paper guide": lambda prompts: pipes["paper"](prompts, num_inference_steps=steps, guidance_scale=W, output_type="np"),
        "cfg + carry": lambda prompts: plain(prompts, num_inference_steps=steps, guidance_scale=W, mode="cfg", policy=carry, output_type="np"),
        "8-step guide": lambda prompts: pipes["8-step"](prompts, guidance_scale=W, output_type="np"),
        "4-step guide": lambda prompts: pipes["4-step"](prompts, guidance_scale=W, output_type="np"),
        "single pass": lambda prompts: sd(prompts, num_inference_steps=steps, guidance_scale=1.0, output_type="np"),
    }


def compiled(sd) -> None:
    """The UNet (and through it every pipeline sharing it) compiled; the guides run eagerly (they are tiny)."""
    sd.unet = torch.compile(sd.unet, fullgraph=True)


def timed(calls: dict, prompts: list[str], repeats: int, warmup: int, device) -> dict[str, float]:
    """Median seconds per call of each, timed in turns after warm-up calls."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for call in calls.values():
            call(prompts)
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call(prompts)
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def training_rates(sd, device, dtype, batch: int, seconds: float, steps: int = STEPS) -> dict[str, float]:
    """The recommended recipe's two costs: teacher trajectories (CFG, 25 DDIM steps) per minute, and guide steps per second
    (the output guide's loss at stored teacher states, backward through the guide only, AdamW)."""
    from pnpguide.teacher import output_guided, unconditional_and_conditional

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    prompts = (PROMPTS * batch)[:batch]
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs == 0:
        sd(prompts, num_inference_steps=steps, guidance_scale=W, output_type="latent")
        sync()
        runs += batch
    trajectories_per_minute = runs / (time.perf_counter() - start) * 60
    guide = OutputGuide.from_unet(sd.unet).to(device=device)  # trained in fp32, as the distillation loop does
    optimizer = torch.optim.AdamW(guide.parameters(), lr=1e-4)
    size, width = sd.unet.config.sample_size, sd.unet.config.cross_attention_dim
    sample = torch.randn(batch, 4, size, size, device=device, dtype=dtype)
    embeds = torch.randn(batch, 77, width, device=device, dtype=dtype)
    added = None
    if sd.unet.config.addition_embed_type == "text_time":
        text_dim = sd.unet.config.projection_class_embeddings_input_dim - 6 * sd.unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2 * batch, text_dim, device=device, dtype=dtype), "time_ids": torch.randn(2 * batch, 6, device=device, dtype=dtype)}
    with torch.no_grad():  # one teacher call: the states and outputs a stored trajectory holds
        uncond, cond = unconditional_and_conditional(sd.unet, sample, 500, embeds, embeds, added)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps == 0:
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            prediction = output_guided(guide, cond, sample, torch.full((batch,), 500, device=device), embeds, W)
        loss = (prediction.float() - (uncond + W * (cond - uncond)).float()).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sync()
        steps += 1
    return {"teacher trajectories per minute": trajectories_per_minute, "guide steps per second": steps / (time.perf_counter() - start),
            "batch": batch}


def table(model: str, batch: int, mode: str, seconds: dict[str, float]) -> list[dict]:
    cfg, single = seconds["cfg"], seconds["single pass"]
    ceiling = cfg / single
    rows = []
    for name, value in seconds.items():
        speedup = cfg / value
        rows.append({"model": model, "batch": batch, "mode": mode, "method": name, "ms_per_image": 1000 * value / batch,
                     "speedup_vs_cfg": speedup, "share_of_ceiling": speedup / ceiling})
        print(f"| {model} | {batch} | {mode} | {name} | {1000 * value / batch:.1f} | {speedup:.2f}x | {speedup / ceiling:.0%} |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: a smoke run)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=("sd15", "sdxl"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--sdxl-batch-sizes", type=int, nargs="+", default=[1, 4], help="SDXL at 1024 px is 4x SD1.5's work a step (default: 1 4)")
    parser.add_argument("--steps", type=int, default=STEPS, help="sampling steps of the 25-step rows (default: 25; fewer for a smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also time with the UNet torch.compile'd")
    parser.add_argument("--training", action="store_true", help="also measure the recommended recipe's training rates (SD1.5 at 512 px)")
    parser.add_argument("--tiny", action="store_true", help="narrow models and 64-px images: checks the script, not the speed")
    parser.add_argument("--out", default=None, help="JSON file for every row")
    args = parser.parse_args(argv)
    if args.tiny:
        torch.set_num_threads(1)  # narrow models: one thread is as fast, and a smoke run should not take the machine
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: run this on a GPU machine, or pass --device cpu --tiny for a smoke run")
        return 1
    dtype = getattr(torch, args.dtype)
    rows, training = [], None
    print("| model | batch | mode | method | ms / image | speed-up vs CFG | share of ceiling |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        for model in args.models:
            sd = build(model, args.tiny, args.device, dtype, Path(workdir))
            for mode in ("eager", "compiled") if args.compile else ("eager",):
                if mode == "compiled":
                    compiled(sd)
                calls = methods(sd, args.device, dtype, args.steps)
                for batch in args.batch_sizes if model == "sd15" else args.sdxl_batch_sizes:
                    prompts = (PROMPTS * batch)[:batch]
                    rows += table(model, batch, mode, timed(calls, prompts, args.repeats, args.warmup, args.device))
            if args.training and model == "sd15":
                training = training_rates(sd, args.device, dtype, max(args.batch_sizes), 2 if args.tiny else 30, args.steps)
                print(f"\ntraining (SD1.5, batch {training['batch']}): {training['teacher trajectories per minute']:.1f} teacher trajectories "
                      f"per minute, {training['guide steps per second']:.2f} guide steps per second")
            del sd
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "dtype": args.dtype,
                                              "rows": rows, "training": training}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
