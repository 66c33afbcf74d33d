"""Throwaway: give a trained base cross-attention at 16x16 too (new blocks start as identity), then train on."""
import sys, torch
from diffusers import UNet2DConditionModel
from pnpguide.loading import load_pipeline, save_pipeline
base, out = sys.argv[1], sys.argv[2]
pipe = load_pipeline(base)
config = dict(pipe.unet.config)
config["down_block_types"] = ["CrossAttnDownBlock2D"] * 3
config["up_block_types"] = ["CrossAttnUpBlock2D"] * 3
unet = UNet2DConditionModel.from_config(config)
result = unet.load_state_dict(pipe.unet.state_dict(), strict=False)
assert not result.unexpected_keys, result.unexpected_keys
assert all(".attentions." in k for k in result.missing_keys), result.missing_keys
for block in (unet.down_blocks[0], unet.up_blocks[-1]):
    for attention in block.attentions:
        torch.nn.init.zeros_(attention.proj_out.weight); torch.nn.init.zeros_(attention.proj_out.bias)
x = torch.randn(2, 4, 16, 16); e = torch.randn(2, 20, 384); t = torch.tensor([10, 500])
with torch.no_grad():
    torch.testing.assert_close(unet(x, t, e).sample, pipe.unet(x, t, e).sample)
print("new params", sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in pipe.unet.parameters()))
pipe.unet = unet
save_pipeline(pipe, out)
