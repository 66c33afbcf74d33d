"""The residual oracle: how much of CFG's correction the paper's injection site could carry, with perfect residuals.

The paper's guide adds residuals to the UNet's skip connections and mid block (where ControlNet's go). Here no guide
network is trained: at states of CFG's own sampling trajectory, free residual tensors are optimised with Adam until the
frozen UNet's single conditional pass gives that state's CFG output. The share of the step's CFG gap they close,
1 - |pass - CFG|^2 / |cond - CFG|^2 (1: CFG, 0: the plain conditional pass), is what a perfect residual guide could
reach. A trained guide that stops below it is limited by its prediction of the residuals, not by where they enter.

With --finetune DIR or --lora DIR, the residuals fitted on the base also go into the fine-tune's UNet, at the
fine-tune's own CFG trajectory: the base-trained residual guide at its best there (the paper's plug-and-play
mechanism). Printed beside it: the output-space equivalent (the fine-tune's conditional pass plus the base's exact CFG
correction) and how the two models' CFG corrections compare (norm ratio and cosine).

    python benchmarks/residual_oracle.py                                        # embedded base, 8 prompts, w = 3 and 7.5
    python benchmarks/residual_oracle.py --finetune src/pnpguide/assets/finetunes/pastel-full --out pastel.json
    python benchmarks/residual_oracle.py --lora src/pnpguide/assets/finetunes/outline-lora
    python benchmarks/residual_oracle.py --prompts 2 --steps 4 --at 0 2 --adam-steps 3 --scales 5   # smoke run (seconds)

SD 1.x / 2.x folders only (--base DIR with --prompt-file FILE); the embedded base's prompts are held-out captions.
"""

from __future__ import annotations

import argparse
import json

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from pnpguide import cfg_combine
from pnpguide.embedded import shapes
from pnpguide.loading import default_base_dir
from pnpguide.quiet import quiet_component_types




def load(folder, lora=None) -> StableDiffusionPipeline:
    with quiet_component_types():
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora()
    pipe.unet.requires_grad_(False)
    return pipe


class Model:
    """A UNet with its prompts' embeddings: CFG's two passes and the conditional pass with residuals added."""

    def __init__(self, pipe: StableDiffusionPipeline, prompts: list[str]):
        self.unet = pipe.unet
        with torch.no_grad():
            self.cond, self.uncond = pipe.encode_prompt(prompts, torch.device("cpu"), 1, True)

    @torch.no_grad()
    def cfg(self, x, t, w) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CFG output, conditional, unconditional), batched [uncond; cond] as diffusers does."""
        uncond, cond = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([self.uncond, self.cond])).sample.chunk(2)
        return cfg_combine(uncond, cond, w), cond, uncond

    def with_residuals(self, x, t, residuals) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=self.cond, down_block_additional_residuals=tuple(residuals[:-1]),
                         mid_block_additional_residual=residuals[-1]).sample

    def residual_shapes(self, x, t) -> list[torch.Size]:
        """One shape per skip connection (conv_in, each resnet and downsampler of the encoder), then the mid block's."""
        shapes_, hooks = [], [self.unet.conv_in.register_forward_hook(lambda m, i, o: shapes_.append(o.shape))]
        for block in self.unet.down_blocks:
            hooks.append(block.register_forward_hook(lambda m, i, o: shapes_.extend(r.shape for r in o[1])))
        hooks.append(self.unet.mid_block.register_forward_hook(lambda m, i, o: shapes_.append(o.shape)))
        with torch.no_grad():
            self.unet(x, t, encoder_hidden_states=self.cond)
        for hook in hooks:
            hook.remove()
        return shapes_


def closed(guess, cfg, cond) -> float:
    """Share of the CFG gap at a state closed by `guess`: 1 - |guess - cfg|^2 / |cond - cfg|^2."""
    return 1 - (guess - cfg).pow(2).sum().item() / (cond - cfg).pow(2).sum().item()


def fitted_residuals(model: Model, x, t, w, adam_steps: int, lr: float) -> list[torch.Tensor]:
    """Free residuals (no network) that make the model's one conditional pass give its CFG output at x."""
    residuals = [torch.zeros(shape, requires_grad=True) for shape in model.residual_shapes(x, t)]
    target = model.cfg(x, t, w)[0]
    optimizer = torch.optim.Adam(residuals, lr=lr)
    for _ in range(adam_steps):
        optimizer.zero_grad()
        (model.with_residuals(x, t, residuals) - target).pow(2).mean().backward()
        optimizer.step()
    return [r.detach() for r in residuals]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="SD 1.x/2.x folder (default: the embedded base)")
    parser.add_argument("--prompt-file", default=None, help="one prompt per line (needed with --base)")
    parser.add_argument("--finetune", default=None, help="a full fine-tune of the base: also test the base's residuals on it")
    parser.add_argument("--lora", default=None, help="LoRA weights for the base: also test the base's residuals on base + LoRA")
    parser.add_argument("--prompts", type=int, default=8, help="prompts (default: 8)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of the CFG trajectory (default: 25)")
    parser.add_argument("--at", type=int, nargs="+", default=[0, 4, 10, 18], help="step indices to fit residuals at (default: 0 4 10 18)")
    parser.add_argument("--scales", type=float, nargs="+", default=[3.0, 7.5], help="guidance scales w (default: 3 7.5)")
    parser.add_argument("--adam-steps", type=int, default=150, help="Adam steps per state (default: 150)")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default: 0.05)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    diffusers_logging.disable_progress_bar()
    if args.finetune and args.lora:
        parser.error("give --finetune or --lora, not both")
    if args.base and not args.prompt_file:
        parser.error("--base needs --prompt-file (the held-out captions are the embedded base's)")
    if args.prompt_file:
        lines = [line.strip() for line in open(args.prompt_file, encoding="utf-8") if line.strip()]
        prompts = [lines[i % len(lines)] for i in range(args.prompts)]
    else:
        prompts = shapes.evaluation_captions(args.prompts)
    base_dir = args.base or default_base_dir()
    base_pipe = load(base_dir)
    base = Model(base_pipe, prompts)
    target = None
    if args.finetune or args.lora:
        target = Model(load(args.finetune, None) if args.finetune else load(base_dir, args.lora), prompts)
    follow = target or base  # the trajectory: the fine-tune's own CFG, or the base's
    scheduler = DDIMScheduler.from_config(base_pipe.scheduler.config)
    scheduler.set_timesteps(args.steps)
    size = base_pipe.unet.config.sample_size
    result = {"base": str(base_dir), "finetune": args.finetune, "lora": args.lora, "prompts": len(prompts), "adam_steps": args.adam_steps,
              "rows": []}
    header = "| w | step | t | residuals on the base |" + (" same residuals on the fine-tune | base's exact correction on the fine-tune | "
                                                           "norm ratio | cosine |" if target else "")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for w in args.scales:
        generator = torch.Generator().manual_seed(args.seed)
        x = torch.randn(len(prompts), base_pipe.unet.config.in_channels, size, size, generator=generator) * scheduler.init_noise_sigma
        for k, t in enumerate(scheduler.timesteps):
            if k in args.at:
                residuals = fitted_residuals(base, x, t, w, args.adam_steps, args.lr)
                cfg_b, cond_b, uncond_b = base.cfg(x, t, w)
                with torch.no_grad():
                    row = {"w": w, "step": k, "t": int(t), "residuals on the base": closed(base.with_residuals(x, t, residuals), cfg_b, cond_b)}
                    if target is not None:
                        cfg_f, cond_f, _ = target.cfg(x, t, w)
                        ft, bs = (cfg_f - cond_f).flatten(), (cfg_b - cond_b).flatten()
                        row.update({"same residuals on the fine-tune": closed(target.with_residuals(x, t, residuals), cfg_f, cond_f),
                                    "base's exact correction on the fine-tune": closed(cond_f + (w - 1) * (cond_b - uncond_b), cfg_f, cond_f),
                                    "norm ratio": (ft.norm() / bs.norm()).item(),
                                    "cosine": torch.nn.functional.cosine_similarity(ft, bs, dim=0).item()})
                result["rows"].append(row)
                print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) and key != "w" else f"{v:g}" for key, v in row.items()) + " |", flush=True)
            x = scheduler.step(follow.cfg(x, t, w)[0], t, x).prev_sample
    if args.out:
        with open(args.out, "w") as file:
            json.dump(result, file, indent=1)
    return result


if __name__ == "__main__":
    main()
