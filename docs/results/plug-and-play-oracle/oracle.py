"""Can any guide trained on the base alone plug into a fine-tune? Oracles that need no guide at all, measured on the
harness (48 held-out prompts, 25 DDIM steps, same noise) against the fine-tune's *own* CFG images.

A guide trained on the base can at best know the base's CFG correction, cond_base - uncond_base. Rows, each one
pass of the fine-tune's conditional branch plus (w - 1) times a correction:
  - "base correction": cond_ft + (w - 1) * (cond_base - uncond_base)   (the best a base-trained guide can know)
  - "base uncond": cond_ft + (w - 1) * (cond_ft - uncond_base)          (what an output guide that predicts the base's
                                                                          unconditional pass from x_t gives)
  - "fine-tune's own CFG" is the reference (gap closed 1); "none" is cond_ft alone (0).
Also per step, teacher-forced at the fine-tune's CFG states, the share of each step's gap closed.
Usage: python oracle.py FINETUNE_DIR|lora:LORA_DIR OUT.json [threads]"""
import json, sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "fidelity-diagnosis"))
from harness import ddim, decode, eval_prompts, noise  # noqa: E402
from pnpguide.loading import encode_captions, load_pipeline  # noqa: E402

target, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
base = load_pipeline(None)
finetune = load_pipeline(None, lora=target[5:]) if target.startswith("lora:") else load_pipeline(target)
if target.startswith("lora:"):
    finetune.fuse_lora()
prompts = eval_prompts(48)


def embeddings(pipe):
    both = encode_captions(pipe, prompts + [""])
    return both[:-1], both[-1:].expand(len(prompts), -1, -1)


(cond_ft_e, empty_ft), (cond_b_e, empty_b) = embeddings(finetune), embeddings(base)


def outputs(x, t):
    """The fine-tune's cond and uncond and the base's, at one state."""
    ft = finetune.unet(torch.cat([x, x]), t, torch.cat([cond_ft_e, empty_ft])).sample.chunk(2)
    b = base.unet(torch.cat([x, x]), t, torch.cat([cond_b_e, empty_b])).sample.chunk(2)
    return {"cond_ft": ft[0], "uncond_ft": ft[1], "cond_b": b[0], "uncond_b": b[1]}


ROWS = {
    "cfg": lambda o, w: o["uncond_ft"] + w * (o["cond_ft"] - o["uncond_ft"]),
    "none": lambda o, w: o["cond_ft"],
    "base correction": lambda o, w: o["cond_ft"] + (w - 1) * (o["cond_b"] - o["uncond_b"]),
    "base uncond": lambda o, w: o["cond_ft"] + (w - 1) * (o["cond_ft"] - o["uncond_b"]),
}


@torch.no_grad()
def sample(row, w, record=None):
    scheduler = ddim(finetune, 25)
    x = noise(len(prompts), 0)
    for t in scheduler.timesteps:
        if record is not None:
            record.append(x.clone())
        x = scheduler.step(ROWS[row](outputs(x, t), w), t, x).prev_sample
    return decode(finetune, x)


@torch.no_grad()
def per_step(row, w, states):
    closed = []
    for x, t in zip(states, ddim(finetune, 25).timesteps):
        o = outputs(x, t)
        cfg, none, guess = ROWS["cfg"](o, w), ROWS["none"](o, w), ROWS[row](o, w)
        closed.append(round(1 - (guess - cfg).pow(2).sum().item() / (none - cfg).pow(2).sum().item(), 3))
    return closed


result = {"finetune": target, "image_gap_closed": {}, "per_step_closed_teacher_forced": {}}
none_image = sample("none", 1.0)
for w in (3.0, 5.0, 7.5):
    states = []
    reference = sample("cfg", w, states)
    gap = ((none_image - reference) ** 2).mean().item()
    for row in ("base correction", "base uncond"):
        image = sample(row, w)
        result["image_gap_closed"].setdefault(row, {})[w] = round(1 - ((image - reference) ** 2).mean().item() / gap, 3)
        result["per_step_closed_teacher_forced"].setdefault(row, {})[w] = per_step(row, w, states)
    print(w, {row: v[w] for row, v in result["image_gap_closed"].items()}, flush=True)
json.dump(result, open(out, "w"), indent=1)
