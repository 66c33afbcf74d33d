"""Is the first-steps guide short of information or of fit? Give it the UNet's last decoder features and see.

Stop 28 found the shipped `output-first5` stuck at 0.87 / 0.82 of steps 3 and 4's gap even at the states it trained on,
at 32 and at 64 channels. It reads x_t and the conditional output (4 + 4 channels). The conditional pass computes far
more: the last up block's output (64 channels here, 320 on SD1.5), from which conv_out makes those 4 channels. This
probe continues the shipped guide in two arms on the same batches: as it is, and with those features added after its
conv_in through a zero-initialised 1x1 projection (so both start as the shipped guide). If the features arm fits the
steps better, at trained-on and held-out states, the limit is what the guide reads.

Usage: python probe.py TRAJECTORY_RUN_DIR PROMPT_SEED OUT.json [SHARDS] [STEPS] [THREADS]
"""

import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pnpguide.conditioning import encode_prompts
from pnpguide.loading import load_guide, load_pipeline
from pnpguide.sources import _digest, shapes_captions

run_dir, prompt_seed, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
shards, steps = (int(sys.argv[4]) if len(sys.argv) > 4 else 64), (int(sys.argv[5]) if len(sys.argv) > 5 else 1500)
torch.set_num_threads(int(sys.argv[6]) if len(sys.argv) > 6 else 1)
torch.manual_seed(0)
pipe = load_pipeline()
unet = pipe.unet.eval().requires_grad_(False)
prompts = shapes_captions(20000, prompt_seed + 7)
index = json.loads((run_dir / "trajectories/index.json").read_text())
assert index["fingerprint"]["prompts"] == _digest(prompts), "not the captions these trajectories were sampled from"


def load(folder: Path, count: int) -> dict:
    """Every row of the first `count` shards, plus the UNet's last decoder features at each state (conditional pass)."""
    parts = []
    for file in sorted(folder.glob("shard-*.safetensors"))[:count]:
        with safe_open(str(file), framework="pt") as f:
            parts.append({k: f.get_tensor(k) for k in ("latents", "timesteps", "guidance", "prompt_ids", "unconditional", "conditional")})
    data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    data["embeds"], data["features"] = [], []
    captured = {}
    hook = unet.up_blocks[-1].register_forward_hook(lambda module, args, output: captured.update(features=output))
    with torch.no_grad():
        for start in range(0, len(data["latents"]), 256):
            rows = slice(start, start + 256)
            embeds = encode_prompts(pipe, [prompts[i] for i in data["prompt_ids"][rows].tolist()], "cpu", 64).prompt_embeds
            conditional = unet(data["latents"][rows], data["timesteps"][rows], embeds).sample
            if start == 0:  # the recorded conditional output is this very pass
                assert (conditional - data["conditional"][rows]).abs().max() < 1e-3
            data["embeds"].append(embeds)
            data["features"].append(captured["features"].half())
    hook.remove()
    data["embeds"], data["features"] = torch.cat(data["embeds"]), torch.cat(data["features"])
    return data


class FeatureInput(nn.Module):
    """conv_in(x_t, output) + a zero-initialised projection of the decoder features set in `features` before each call."""

    def __init__(self, conv_in: nn.Conv2d, channels: int):
        super().__init__()
        self.conv_in, self.features = conv_in, None
        self.norm = nn.GroupNorm(8, channels)
        self.proj = nn.Conv2d(channels, conv_in.out_channels, kernel_size=1)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)

    def forward(self, inputs):
        return self.conv_in(inputs) + self.proj(self.norm(self.features.float()))


def difference(guide, data, rows, with_features):
    if with_features:
        guide.output_head.conv_in.features = data["features"][rows]
    return guide(data["latents"][rows], data["timesteps"][rows], data["embeds"][rows], 2.0, unet_output=data["conditional"][rows]).sample


def per_step_gap(guide, data, with_features, limit=2048) -> dict:
    """Share of each step's gap (cond - uncond) the guide closes: 1 - sum |pred - target|^2 / sum |target|^2."""
    errors, totals = {}, {}
    with torch.no_grad():
        for start in range(0, min(limit, len(data["latents"])), 256):
            rows = slice(start, min(start + 256, limit))
            target = data["conditional"][rows] - data["unconditional"][rows]
            error = (difference(guide, data, rows, with_features) - target).pow(2).flatten(1).sum(1)
            for t, e, g in zip(data["timesteps"][rows].tolist(), error.tolist(), target.pow(2).flatten(1).sum(1).tolist()):
                errors[t], totals[t] = errors.get(t, 0) + e, totals.get(t, 0) + g
    return {t: round(1 - errors[t] / totals[t], 4) for t in sorted(errors, reverse=True)}


started = time.time()
train, held_out = load(run_dir / "trajectories", shards), load(run_dir / "validation-trajectories", 10**6)
train_view = {k: v[torch.randperm(len(v), generator=torch.Generator().manual_seed(1))] for k, v in train.items()}  # mixed steps for scoring
print(f"loaded {len(train['latents'])} training and {len(held_out['latents'])} held-out states in {time.time() - started:.0f}s", flush=True)
step_gap = {t: (train["conditional"] - train["unconditional"])[train["timesteps"] == t].pow(2).mean().item() for t in train["timesteps"].unique().tolist()}
weight = torch.tensor([1 / step_gap[t] for t in train["timesteps"].tolist()])  # per-timestep normalised, as --loss-weighting timestep

arms = {}
for name, with_features in (("as shipped", False), ("+ decoder features", True)):
    guide = load_guide("output-first5").float().train()
    if with_features:
        guide.output_head.conv_in = FeatureInput(guide.output_head.conv_in, train["features"].shape[1])
    optimizer = torch.optim.AdamW(guide.parameters(), lr=3e-4, weight_decay=0.0)
    arms[name] = (guide, with_features, optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps))
result = {name: {"before": {"trained-on": per_step_gap(g, train_view, f), "held-out": per_step_gap(g, held_out, f)}} for name, (g, f, _, _) in arms.items()}
print(json.dumps(result), flush=True)
generator, log = torch.Generator().manual_seed(2), {name: [] for name in arms}
for step in range(1, steps + 1):
    rows = torch.randint(len(train["latents"]), (64,), generator=generator)
    target = train["conditional"][rows] - train["unconditional"][rows]
    for name, (guide, with_features, optimizer, schedule) in arms.items():
        loss = ((difference(guide, train, rows, with_features) - target).pow(2).mean((1, 2, 3)) * weight[rows]).mean()
        optimizer.zero_grad(), loss.backward(), optimizer.step(), schedule.step()
        log[name].append(loss.item())
    if step % 250 == 0:
        print(step, {name: round(sum(v[-250:]) / 250, 4) for name, v in log.items()}, f"{time.time() - started:.0f}s", flush=True)
for name, (guide, with_features, _, _) in arms.items():
    guide.eval()
    result[name]["after"] = {"trained-on": per_step_gap(guide, train_view, with_features), "held-out": per_step_gap(guide, held_out, with_features)}
    result[name]["loss_per_250"] = [round(sum(log[name][i:i + 250]) / 250, 4) for i in range(0, steps, 250)]
result["settings"] = {"run": str(run_dir), "training_states": len(train["latents"]), "held_out_states": len(held_out["latents"]), "steps": steps,
                      "batch": 64, "lr": "3e-4 cosine", "features": f"unet.up_blocks[-1] output, {train['features'].shape[1]} channels"}
print(json.dumps(result, indent=1))
json.dump(result, open(out, "w"), indent=1)
