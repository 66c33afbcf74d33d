"""Helpers for the drop-in tests: a LoRA and an IP-Adapter with random weights on a tiny UNet, and callbacks."""

import torch
from peft import LoraConfig


def add_random_lora(unet, rank: int = 4) -> None:
    """LoRA weights on the UNet's attention projections, every one non-zero, as `load_lora_weights` would leave them."""
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(4)
    for name, parameter in unet.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(parameter, std=0.2)


def add_random_ip_adapter(unet, image_dim: int = 8) -> None:
    """An IP-Adapter (image projection + key/value projections for every cross-attention layer) with random weights,
    in the state-dict layout `load_ip_adapter` reads."""
    torch.manual_seed(5)
    cross = unet.config.cross_attention_dim
    adapter, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = name.split(".")[0]
        widths = list(reversed(unet.config.block_out_channels)) if block == "up_blocks" else unet.config.block_out_channels
        hidden = unet.config.block_out_channels[-1] if block == "mid_block" else widths[int(name.split(".")[1])]
        adapter[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross) * 0.2
        adapter[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross) * 0.2
        key_id += 2
    projection = {"proj.weight": torch.randn(4 * cross, image_dim) * 0.2, "proj.bias": torch.zeros(4 * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    unet._load_ip_adapter_weights([{"image_proj": projection, "ip_adapter": adapter}], low_cpu_mem_usage=False)


def image_embeds(image_dim: int = 8, cfg: bool = True) -> list[torch.Tensor]:
    """`ip_adapter_image_embeds` for one image prompt: [negative; positive] rows for CFG, as diffusers takes them."""
    torch.manual_seed(6)
    positive = torch.randn(1, 1, image_dim)
    return [torch.cat([torch.zeros_like(positive), positive])] if cfg else [positive]


def scale_latents_at_step(step: int, factor: float = 0.8):
    """A callback_on_step_end that scales the latents once: its effect shows in the image, so both pipelines must apply it."""
    def callback(pipe, i, t, tensors):
        if i == step:
            tensors["latents"] = tensors["latents"] * factor
        return tensors
    return callback
