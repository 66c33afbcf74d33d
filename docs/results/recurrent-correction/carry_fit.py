"""The carry factors the experiments use (the library's CorrectionCarry.fit does the same through the pipeline)."""
import sys, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent.parent / "fidelity-diagnosis"))
from harness import ddim, noise
from pnpguide.embedded import shapes
from pnpguide.loading import encode_captions


@torch.no_grad()
def fit_carry(pipe, empty, w, n=64, steps=25):
    """a_k = <d_k, d_k-1> / |d_k-1|^2 over n training captions' CFG trajectories at this w (a_0 = 1)."""
    emb = encode_captions(pipe, shapes.split_captions(n, split="train", seed=7))
    s = ddim(pipe, steps); x = noise(n, 5000); ds = []
    for t in s.timesteps:
        x_in = s.scale_model_input(x, t)
        u, c = pipe.unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=torch.cat([empty.expand_as(emb), emb])).sample.chunk(2)
        ds.append(c - u); x = s.step(u + w * (c - u), t, x).prev_sample
    return [1.0] + [((ds[k] * ds[k - 1]).sum() / (ds[k - 1] ** 2).sum()).item() for k in range(1, steps)]
