"""Parameters and FLOPs ratio (UNet + guide) / (2 UNet), attention counted, of the first-steps output guide at 32 channels
(shipped) and widened 2x and 4x (GuideModel.widened), on the embedded UNet and on SD1.5 / SDXL UNets built from their
published configs on the meta device; the guide runs at the first 5 of 25 steps, its correction carried on after them.
Output: cost.txt."""
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
    with torch.device(unet.device):
        tiny = GuideModel.from_unet(unet, "tiny", reads="unet_output")
        for factor in (1, 2, 4):  # the same architecture widened() returns, built from its config (no weights on meta)
            guide = GuideModel.from_config({**tiny.config, "block_out_channels": [c * factor for c in tiny.config.block_out_channels],
                                            "norm_num_groups": tiny.config.norm_num_groups * factor})
            cost = step_cost(unet, guide, tokens=16 if config is None else 77)
            print(f"{name} {guide.config.block_out_channels[0]} channels: params {parameter_count(guide):,} "
                  f"({parameter_count(guide) / parameter_count(unet):.4%} of the UNet), guide {cost.guide / 1e9:.3f} GFLOPs, "
                  f"ratio at every step {cost.ratio:.4f}, at the first 5 of 25 steps only {cost.sampling_ratio(25, 5):.4f}")
