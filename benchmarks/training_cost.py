"""What one stage-1 distillation step costs on SD1.5 and SDXL, counted rather than measured (no GPU needed).

    python benchmarks/training_cost.py                       # SD1.5 at 512 px, SDXL at 1024 px, both tiny guides
    python benchmarks/training_cost.py --tflops 300          # time per step at another assumed sustained rate

Everything runs on the meta device (shapes only, no memory, no arithmetic):
- FLOPs per sample of one step: the CFG teacher (one UNet call at 2B, no grad), the student (UNet + guide) and
  its backward into the guide (the UNet is frozen: activation gradients only, no weight gradients), counted by
  torch's FlopCounterMode with attention as plain matmuls; and the same at a teacher trajectory state, which is
  stored with the teacher's outputs (no teacher call; an output guide's student is the guide alone, on the
  recorded conditional output);
- activation memory per sample: the bytes autograd saves for that backward (attention as a fused GPU kernel
  keeps it: q, k, v, output, no score matrix), counted with saved-tensor hooks in fp32 (bf16 autocast stores most of them in half the bytes;
  allocator overhead, workspaces and transient peaks are not counted, so treat it as a lower bound);
- time per step = FLOPs / an assumed sustained rate (--tflops): an estimate, not a measurement.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DConditionModel

from pnpguide.evaluation.speed import SD15, SDXL, count_flops, parameter_count, plain_attention
from pnpguide.guide import GuideModel
from pnpguide.teacher import cfg_noise_pred, guided_noise_pred, output_guided

SETUPS = {"sd15": (SD15, 512), "sdxl": (SDXL, 1024)}  # config, image side in pixels (latents are 1/8 of it)
TOKENS = 77
GIB = 2**30


def inputs(config: dict, side: int) -> dict:
    latent = side // 8
    added = None
    if config.get("addition_embed_type") == "text_time":
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {"text_embeds": torch.randn(1, text_dim), "time_ids": torch.randn(1, 6)}
    return {"sample": torch.randn(1, 4, latent, latent), "timestep": torch.tensor([500]),
            "embeds": torch.randn(1, TOKENS, config["cross_attention_dim"]), "added": added}


class _FusedAttention(torch.autograd.Function):
    """What a fused SDPA kernel (flash / memory-efficient, as GPUs run it) keeps for backward: q, k, v, the output
    and one log-sum-exp per query row, never the (queries x keys) score matrix that the math path on meta saves."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1]))
        return out


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward of `fn()`, attention counted as a fused kernel's."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda query, key, value, **kwargs: _FusedAttention.apply(query, key, value)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            fn()
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return total


def step_cost(config: dict, side: int, reads: str) -> dict:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).requires_grad_(False)
        guide = GuideModel.from_unet(unet, "tiny", reads=reads)
        x = inputs(config, side)
    doubled = None if x["added"] is None else {k: torch.cat([v, v]) for k, v in x["added"].items()}

    def teacher():
        with torch.no_grad():
            return cfg_noise_pred(unet, x["sample"], x["timestep"], x["embeds"], x["embeds"], 5.0, added_cond_kwargs=doubled)

    def student():
        if guide.reads_unet_output:  # training passes the teacher's conditional output as the student's UNet call
            return output_guided(guide, x["sample"].clone(), x["sample"], x["timestep"], x["embeds"], 5.0)
        return guided_noise_pred(unet, guide, x["sample"], x["timestep"], x["embeds"], 5.0, added_cond_kwargs=x["added"])

    def student_and_backward():
        student().float().pow(2).mean().backward()

    with plain_attention(unet, guide):  # FlopCounterMode counts SDPA as 0 on some backends
        student_flops = count_flops(student_and_backward)
        flops = count_flops(teacher) + student_flops
    activations = saved_bytes(student)
    return {"unet_params": parameter_count(unet), "guide_params": parameter_count(guide), "flops": flops,
            "recorded_flops": student_flops, "activations": activations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tflops", type=float, default=100.0, help="assumed sustained TFLOP/s of one GPU (default: 100)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per GPU per step, for the per-step columns (default: 32)")
    args = parser.parse_args()
    print(f"| base | image | guide reads | UNet params | guide params | TFLOPs / sample | at a recorded teacher state | "
          f"s / step at batch {args.batch_size} ({args.tflops:g} TFLOP/s, estimate) | at a recorded state | "
          f"saved activations GiB / sample (fp32) | at batch {args.batch_size} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (config, side) in SETUPS.items():
        for reads in ("latent", "unet_features", "unet_output"):
            cost = step_cost(config, side, reads)
            seconds = [flops * args.batch_size / (args.tflops * 1e12) for flops in (cost["flops"], cost["recorded_flops"])]
            per_sample = cost["activations"] / GIB
            print(f"| {name} | {side} px | {reads} | {cost['unet_params'] / 1e6:.1f}M | {cost['guide_params'] / 1e6:.2f}M | "
                  f"{cost['flops'] / 1e12:.3f} | {cost['recorded_flops'] / 1e12:.3f} | {seconds[0]:.2f} | {seconds[1]:.3f} | "
                  f"{per_sample:.3f} | {per_sample * args.batch_size:.2f} |", flush=True)


if __name__ == "__main__":
    main()
