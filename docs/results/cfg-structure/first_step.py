"""At the first, pure-noise step (t = 999): how much of CFG's correction (w - 1) * (cond - uncond) depends on the
prompt alone, and how much on the noise? 16 held-out prompts x 16 noises, w = 7.5."""
import sys, torch
from pathlib import Path
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "fidelity-diagnosis"))
from harness import *

torch.set_num_threads(1)
pipe = load_base(); unet = pipe.unet
prompts, noises, w = eval_prompts(16), 16, 7.5
emb_all = encode_captions(pipe, prompts + [""]); emb, empty = emb_all[:-1], emb_all[-1:]
s = ddim(pipe, 25); t = s.timesteps[0]
x = noise(noises, 1000).mul(s.init_noise_sigma)  # the same 16 noises for every prompt
with torch.no_grad():
    corr = []
    for p in range(len(prompts)):
        e = emb[p : p + 1].expand(noises, -1, -1)
        cond = unet(s.scale_model_input(x, t), t, e).sample
        uncond = unet(s.scale_model_input(x, t), t, empty.expand_as(e)).sample
        corr.append((w - 1) * (cond - uncond))
corr = torch.stack(corr)  # (prompts, noises, C, h, w)
total = corr.pow(2).mean()
prompt_mean = corr.mean(1, keepdim=True)            # what the prompt alone determines
noise_mean = corr.mean(0, keepdim=True)             # what the noise alone determines
residual = corr - prompt_mean - noise_mean + corr.mean((0, 1), keepdim=True)
print(f"t = {int(t)}: mean squared correction {total:.4f}")
print(f"share explained by the prompt alone (mean over noises): {prompt_mean.pow(2).mean() / total:.3f}")
print(f"share explained by the noise alone (mean over prompts): {noise_mean.pow(2).mean() / total:.3f}")
print(f"share left to prompt x noise interaction: {residual.pow(2).mean() / total:.3f}")
