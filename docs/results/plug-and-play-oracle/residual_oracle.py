"""Would a guide in the paper's design (residuals into the UNet's skip connections and mid block) plug into a
fine-tune, if it predicted the base's residuals perfectly? An oracle per state, teacher-forced at the fine-tune's own
CFG trajectory (harness prompts and noise, 25 DDIM steps):
  1. free residuals (no network) are optimised until the *base* UNet's one conditional pass gives the base's CFG output
     at that state (what a perfect base-trained residual guide would output there);
  2. the same residuals go into the *fine-tune's* UNet; the share of the fine-tune's own CFG gap closed is reported,
     beside the output-space oracle cond_ft + (w - 1) * (cond_base - uncond_base) at the same state (oracle.py);
  3. how the two models' CFG corrections (CFG output - conditional output) compare there: norm ratio and cosine.
Usage: python residual_oracle.py FINETUNE_DIR|lora:LORA_DIR OUT.json [threads] [prompts] [adam steps]"""
import json, sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "fidelity-diagnosis"))
from harness import ddim, eval_prompts, noise  # noqa: E402
from pnpguide.guide import GuideModel  # noqa: E402
from pnpguide.loading import encode_captions, load_pipeline  # noqa: E402

target, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
n = int(sys.argv[4]) if len(sys.argv) > 4 else 16
adam_steps = int(sys.argv[5]) if len(sys.argv) > 5 else 300
W = (3.0, 7.5)
STEPS = tuple(int(k) for k in sys.argv[6].split(",")) if len(sys.argv) > 6 else (0, 2, 4, 8, 12, 18, 24)
base = load_pipeline(None)
finetune = load_pipeline(None, lora=target[5:]) if target.startswith("lora:") else load_pipeline(target)
if target.startswith("lora:"):
    finetune.fuse_lora()
for unet in (base.unet, finetune.unet):
    unet.requires_grad_(False)
prompts = eval_prompts(48)[: n // 2] + eval_prompts(48)[24 : 24 + n // 2]  # as many one- as two-object prompts


def embeddings(pipe):
    both = encode_captions(pipe, prompts + [""])
    return both[:-1], both[-1:].expand(len(prompts), -1, -1)


embeds = {"ft": embeddings(finetune), "base": embeddings(base)}
unets = {"ft": finetune.unet, "base": base.unet}


def cfg_and_cond(which, x, t, w):
    cond, uncond = unets[which](torch.cat([x, x]), t, torch.cat(embeds[which])).sample.chunk(2)
    return uncond + w * (cond - uncond), cond, uncond


def with_residuals(which, x, t, residuals):
    return unets[which](x, t, embeds[which][0], down_block_additional_residuals=residuals[:-1], mid_block_additional_residual=residuals[-1]).sample


def shares(guess, cfg, cond):
    return round(1 - (guess - cfg).pow(2).sum().item() / (cond - cfg).pow(2).sum().item(), 3)


def correction_stats(finetune_correction, base_correction):
    """How the fine-tune's CFG correction at a state compares with the base's: norm ratio and cosine."""
    f, b = finetune_correction.flatten(), base_correction.flatten()
    return {"|fine-tune correction| / |base correction|": round((f.norm() / b.norm()).item(), 3),
            "cosine(fine-tune correction, base correction)": round(torch.nn.functional.cosine_similarity(f, b, dim=0).item(), 3)}


def fitted_residuals(x, t, w):
    """Free residuals that make the base's one conditional pass give the base's CFG output at x."""
    zeros = GuideModel.from_unet(base.unet, size="tiny")(x, t.expand(len(x)), embeds["base"][0], torch.full((len(x),), w))
    residuals = [torch.zeros_like(r, requires_grad=True) for r in (*zeros.down_block_additional_residuals, zeros.mid_block_additional_residual)]
    with torch.no_grad():
        cfg_b, _, _ = cfg_and_cond("base", x, t, w)
    optimizer = torch.optim.Adam(residuals, lr=0.05)
    for _ in range(adam_steps):
        optimizer.zero_grad()
        loss = (with_residuals("base", x, t, residuals) - cfg_b).pow(2).mean()
        loss.backward()
        optimizer.step()
    return [r.detach() for r in residuals]


result = {"finetune": target, "prompts": n, "adam_steps": adam_steps, "per_step": {}}
scheduler = ddim(finetune, 25)
for w in W:
    x, rows = noise(n, 0), []
    for k, t in enumerate(scheduler.timesteps):
        if k in STEPS:
            residuals = fitted_residuals(x, t, w)
            with torch.no_grad():
                cfg_b, cond_b, uncond_b = cfg_and_cond("base", x, t, w)
                cfg_f, cond_f, _ = cfg_and_cond("ft", x, t, w)
                rows.append({"step": k, "t": int(t),
                             "residuals on the base": shares(with_residuals("base", x, t, residuals), cfg_b, cond_b),
                             "same residuals on the fine-tune": shares(with_residuals("ft", x, t, residuals), cfg_f, cond_f),
                             "output-space base correction on the fine-tune": shares(cond_f + (w - 1) * (cond_b - uncond_b), cfg_f, cond_f),
                             **correction_stats(cfg_f - cond_f, cfg_b - cond_b)})
            print(w, rows[-1], flush=True)
        with torch.no_grad():
            x = scheduler.step(cfg_and_cond("ft", x, t, w)[0], t, x).prev_sample  # the fine-tune's own CFG trajectory
    result["per_step"][w] = rows
json.dump(result, open(out, "w"), indent=1)
