"""What limits a base-trained output guide on a fine-tune: per step of the first five, teacher-forced at the fine-tune's
own CFG states, the share of that step's gap to the fine-tune's CFG output that is closed by
  - the guide (its cond - uncond prediction from the fine-tune's conditional output),
  - the base's exact correction (cond_ft + (w - 1) * (cond_base - uncond_base): a perfect base-trained output guide),
and the cosine of the guide's predicted correction with the fine-tune's own. 16 held-out prompts of a group, 25 DDIM steps.
Usage: python first_steps.py MODEL GROUP GUIDE_DIR[,GUIDE_DIR...] OUT.json   (MODEL: a shipped name, e.g. bar-lora; GROUP:
ordinary or concept)"""
import json, sys

import torch

from pnpguide.evaluation.evaluate import parse_model_spec
from pnpguide.evaluation.sampling import as_plug_and_play
from pnpguide.evaluation.transfer import transfer_prompts
from pnpguide.loading import load_guide, load_pipeline
from pnpguide.teacher import guided_noise_pred

torch.set_num_threads(1)
spec = parse_model_spec(sys.argv[1])
group, guides, out = sys.argv[2], sys.argv[3].split(","), sys.argv[4]
prompts = list(transfer_prompts(16, spec.concept).values())[0 if group == "ordinary" else 1]
base = as_plug_and_play(load_pipeline(None))
ft = as_plug_and_play(load_pipeline(spec.base, spec.lora))
guide_models = {g: load_guide(g).eval() for g in guides}
result = {"model": spec.name, "group": group, "prompts": len(prompts), "steps": {}}
with torch.no_grad():
    cond_ft_e, empty_ft = ft.encode_prompt(prompts, "cpu", 1, True)
    cond_b_e, empty_b = base.encode_prompt(prompts, "cpu", 1, True)
    for w in (3.0, 5.0, 7.5):
        states = []
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        ft(prompts, guidance_scale=w, num_inference_steps=25, generator=generators, mode="cfg", output_type="latent",
           on_model_output=lambda t, x, *_: states.append((t, x.clone())))
        rows = []
        for t, x in states[:5]:
            cfg, cond = ft.cfg_outputs(x, t, cond_ft_e, empty_ft, w)
            b_cfg, b_cond = base.cfg_outputs(x, t, cond_b_e, empty_b, w)
            d_ft = (cfg - cond) / (w - 1)
            gap = (cond - cfg).pow(2).sum()
            row = {"t": int(t), "base correction": 1 - (cond + (b_cfg - b_cond) - cfg).pow(2).sum().item() / gap.item()}
            for name, guide in guide_models.items():
                guided = guided_noise_pred(ft.unet, guide, x, t, cond_ft_e, w)
                row[name] = 1 - (guided - cfg).pow(2).sum().item() / gap.item()
                row[name + " cosine"] = torch.nn.functional.cosine_similarity(((guided - cond) / (w - 1)).flatten(1), d_ft.flatten(1)).mean().item()
            rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        result["steps"][w] = rows
        print(w, rows, flush=True)
json.dump(result, open(out, "w"), indent=1)
