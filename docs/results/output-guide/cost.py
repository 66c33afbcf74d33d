"""Parameters and FLOPs ratio (UNet + guide) / (2 UNet), attention counted, of the output guides on the embedded UNet and
on SD1.5 / SDXL UNets built from their published configs on the meta device. Output: cost.txt.
With an argument K (stop 24): also the ratio over a 25-step run whose guide runs only at its first K steps, the
correction carried on after them (../first-steps-guide/cost.txt).
With K and widening factors F... (stop 28): the tiny guide widened F times (GuideModel.widened) instead of tiny and full
(../wider-first-steps/cost.txt).
With K and "neg" (stop 29): the tiny guide and the tiny guide with a negative head (../negative-head/cost.txt)."""
import sys
import torch
from diffusers import UNet2DConditionModel
from pnpguide.evaluation.speed import SD15, SDXL, step_cost, parameter_count
from pnpguide.guide import GuideModel
from pnpguide.loading import load_pipeline

first_steps = int(sys.argv[1]) if len(sys.argv) > 1 else None
negative_head = "neg" in sys.argv[2:]
factors = [int(f) for f in sys.argv[2:] if f != "neg"]


def guides(unet):
    """(label, guide): tiny and full, the tiny guide widened by each factor, or it with and without a negative head."""
    if negative_head:
        tiny = GuideModel.from_unet(unet, "tiny", reads="unet_output")
        return [("tiny", tiny), ("tiny + negative head", tiny.with_negative_head())]
    if not factors:
        return [(size, GuideModel.from_unet(unet, size, reads="unet_output")) for size in ("tiny", "full")]
    tiny = GuideModel.from_unet(unet, "tiny", reads="unet_output")
    return [(f"{tiny.config.block_out_channels[0] * f} channels", tiny.widened(f)) for f in factors]


for name, config in (("embedded", None), ("sd15", SD15), ("sdxl", SDXL)):
    if config is None:
        unet = load_pipeline(None).unet
    else:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
    with torch.device(unet.device):
        labelled = guides(unet)
    for label, guide in labelled:
        cost = step_cost(unet, guide, tokens=16 if config is None else 77)
        print(f"{name} {label}: params {parameter_count(guide):,} ({parameter_count(guide) / parameter_count(unet):.4%} of the UNet), "
              f"guide {cost.guide / 1e9:.3f} GFLOPs, UNet {cost.unet / 1e9:.2f}, ratio {cost.ratio:.4f}"
              + (f", guide at the first {first_steps} of 25 steps only: ratio {cost.sampling_ratio(25, first_steps):.4f}" if first_steps else ""))
