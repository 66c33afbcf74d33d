"""Fidelity experiments: per-step and image gap closed against CFG, and a small training loop with variants."""
from __future__ import annotations

import json, math, os, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from safetensors.torch import load_file, save_file

from pnpguide.embedded import shapes
from pnpguide.loading import encode_captions, load_pipeline
from pnpguide.embedded.base import cache_dataset
from pnpguide.teacher import cfg_combine, cfg_noise_pred, guided_noise_pred

CACHE = Path("/tmp/fidcache"); CACHE.mkdir(exist_ok=True)


def load_base():
    pipe = load_pipeline(os.environ.get("PNP_BASE"))  # default: the embedded base (base-te3 since stop 20)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    return pipe


def eval_prompts(n=48):
    return shapes.heldout_captions(n // 2, objects=1) + shapes.heldout_captions(n // 2, objects=2)


def ddim(pipe, steps):
    s = DDIMScheduler.from_config(pipe.scheduler.config); s.set_timesteps(steps); return s


def noise(n, seed, shape=(4, 16, 16)):
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


@torch.no_grad()
def sample(pipe, predict, emb, w, steps=25, seed=0, record=None):
    """predict(x_in, t, emb, w) -> model output. Returns final latents; record(t, x_in) per step."""
    s = ddim(pipe, steps)
    x = noise(len(emb), seed)
    for t in s.timesteps:
        x_in = s.scale_model_input(x, t)
        if record is not None:
            record(t, x_in)
        x = s.step(predict(x_in, t, emb, w), t, x).prev_sample
    return x


@torch.no_grad()
def decode(pipe, latents):
    img = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return ((img + 1) / 2).clamp(0, 1)


def predictors(pipe, guide, empty):
    unet = pipe.unet
    def cfg(x, t, e, w): return cfg_noise_pred(unet, x, t, e, empty.expand_as(e), w)
    def none(x, t, e, w): return unet(x, t, e).sample
    def gd(x, t, e, w): return guided(unet, guide, x, t, e, w, empty.expand_as(e))
    return cfg, none, gd


def guided(unet, guide, x, t, e, w, empty=None):
    if hasattr(guide, "guided_output"):
        return guide.guided_output(unet, x, t, e, w)
    negative = empty if getattr(guide.config, "reads_negative", False) else None  # the empty negative, as CFG uses here
    return guided_noise_pred(unet, guide, x, t, e, w, negative_prompt_embeds=negative)


@torch.no_grad()
def evaluate(pipe, guide, ws=(3.0, 7.5), n=48, steps=25, seed=0, out=None):
    """Image gap closed and per-step output gap closed at the teacher's states, per w."""
    prompts = eval_prompts(n)
    emb_all = encode_captions(pipe, prompts + [""])
    emb, empty = emb_all[:-1], emb_all[-1:]
    cfg, none, gd = predictors(pipe, guide, empty)
    results = {}
    base = os.environ.get("PNP_BASE", "embedded").strip("/").replace("/", "_")  # CFG images of one base are no other's
    key = CACHE / f"eval-{base}-n{n}-s{steps}-seed{seed}.safetensors"
    cached = load_file(key) if key.exists() else {}
    if "none" not in cached:
        cached["none"] = decode(pipe, sample(pipe, none, emb, 1.0, steps, seed))
    for w in ws:
        if f"cfg{w}" not in cached:
            states = []
            lat = sample(pipe, cfg, emb, w, steps, seed, record=lambda t, x: states.append(x.clone()))
            cached[f"cfg{w}"] = decode(pipe, lat)
            cached[f"states{w}"] = torch.stack(states)
        save_file({k: v.contiguous() for k, v in cached.items()}, key)
    s = ddim(pipe, steps)
    for w in ws:
        img_g = decode(pipe, sample(pipe, gd, emb, w, steps, seed))
        img_c, img_n = cached[f"cfg{w}"], cached["none"]
        mse_g = ((img_g - img_c) ** 2).mean().item(); mse_n = ((img_n - img_c) ** 2).mean().item()
        per_step = []
        for i, t in enumerate(s.timesteps):
            x = cached[f"states{w}"][i]
            out_c = cfg(x, t, emb, w); out_n = none(x, t, emb, w); out_g = gd(x, t, emb, w)
            eg = ((out_g - out_c) ** 2).mean().item(); en = ((out_n - out_c) ** 2).mean().item()
            per_step.append((int(t), eg, en))
        eg_sum = sum(p[1] for p in per_step); en_sum = sum(p[2] for p in per_step)
        rel = [1 - p[1] / p[2] for p in per_step]
        results[w] = {
            "image_gap_closed": 1 - mse_g / mse_n,
            "psnr_guide": -10 * math.log10(mse_g), "psnr_none": -10 * math.log10(mse_n),
            "step_gap_closed_pooled": 1 - eg_sum / en_sum,
            "step_gap_closed_mean": sum(rel) / len(rel),
            "per_step": [(t, round(1 - eg / en, 3), round(en, 4)) for t, eg, en in per_step],
        }
        if out is not None:
            save_file({"guide": img_g}, str(out) + f"-w{w}.safetensors")
    return results


def summary(res):
    return " | ".join(f"w={w}: img {r['image_gap_closed']:.3f} step(mean) {r['step_gap_closed_mean']:.3f} pooled {r['step_gap_closed_pooled']:.3f}" for w, r in res.items())
