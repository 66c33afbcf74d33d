"""Parameters and FLOPs ratio (UNet + guide) / (2 UNet), attention counted, of the output guides on the embedded UNet and
on SD1.5 / SDXL UNets built from their published configs on the meta device. Output: cost.txt.
With an argument K (stop 24): also the ratio over a 25-step run whose guide runs only at its first K steps, the
correction carried on after them (../first-steps-guide/cost.txt)."""
import sys
import torch
from diffusers import UNet2DConditionModel
from pnpguide.evaluation.speed import SD15, SDXL, step_cost, parameter_count
from pnpguide.guide import GuideModel
from pnpguide.loading import load_pipeline

for name, config in (("embedded", None), ("sd15", SD15), ("sdxl", SDXL)):
    if config is None:
        unet = load_pipeline(None).unet
    else:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
    for size in ("tiny", "full"):
        with torch.device(unet.device):
            guide = GuideModel.from_unet(unet, size, reads="unet_output")
        cost = step_cost(unet, guide, tokens=16 if config is None else 77)
        print(f"{name} {size}: params {parameter_count(guide):,} ({parameter_count(guide) / parameter_count(unet):.4%} of the UNet), "
              f"guide {cost.guide / 1e9:.3f} GFLOPs, UNet {cost.unet / 1e9:.2f}, ratio {cost.ratio:.4f}"
              + (f", guide at the first {sys.argv[1]} of 25 steps only: ratio {cost.sampling_ratio(25, int(sys.argv[1])):.4f}" if len(sys.argv) > 1 else ""))
