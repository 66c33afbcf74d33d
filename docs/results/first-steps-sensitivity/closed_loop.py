"""What the stop-25 scripts share: the five-step chains of stored teacher states, the closed-loop sampler, and the
image gap closed of its images against the harness's cached CFG images (48 held-out prompts, same noise)."""
import torch
from harness import ddim, decode, eval_prompts, noise, CACHE
from carry_fit import fit_carry
from safetensors.torch import load_file
from pnpguide.loading import encode_captions

WS = (3.0, 5.0, 7.5)
_images = {}


def chains(states: dict):
    """(N trajectories, K steps, a function laying one stored per-state tensor out as (N, K, ...) in sampling order)."""
    order = torch.argsort(states["idx"] * 10000 - states["t"])
    n = len(states["emb"]); k = len(order) // n
    return n, k, lambda v: v[order].view(n, k, *v.shape[1:])


@torch.no_grad()
def sample(pipe, emb, w, correction):
    """25 DDIM steps from the harness's noise, one conditional UNet pass a step, plus (w - 1) times
    correction(k, x_t, t, cond, the previous correction or None): the decoded images."""
    s = ddim(pipe, 25); z = noise(len(emb), 0); d = None
    for k, t in enumerate(s.timesteps):
        x = s.scale_model_input(z, t)
        c = pipe.unet(x, t, encoder_hidden_states=emb).sample
        d = correction(k, x, t, c, d)
        z = s.step(c + (w - 1) * d, t, z).prev_sample
    return decode(pipe, z)


def held_out_embeddings(pipe):
    """(the 48 held-out prompts' embeddings, the empty prompt's)"""
    both = encode_captions(pipe, eval_prompts(48) + [""])
    return both[:-1], both[-1:]


def image_gap(images, w):
    """1 - MSE(images, CFG's) / MSE(unguided images, CFG's), at guidance scale w."""
    if not _images:
        _images.update(load_file(CACHE / "eval-embedded-n48-s25-seed0.safetensors"))
    ref, none = _images[f"cfg{w}"], _images["none"]
    return round(1 - ((images - ref) ** 2).mean().item() / ((none - ref) ** 2).mean().item(), 3)


def carried_image_gaps(pipe, empty, sample):
    """{w: image gap closed} of sample(w, carry), the carry's factors fitted at each w."""
    return {w: image_gap(sample(w, fit_carry(pipe, empty, w)), w) for w in WS}
