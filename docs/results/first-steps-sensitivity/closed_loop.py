"""What the stop-25 scripts share: the harness's 48 held-out prompts, and the image gap closed of a closed-loop
sample against the harness's cached CFG images (diffusers' pipeline, same noise)."""
from harness import eval_prompts, CACHE
from carry_fit import fit_carry
from safetensors.torch import load_file
from pnpguide.loading import encode_captions

WS = (3.0, 5.0, 7.5)
_images = {}


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
