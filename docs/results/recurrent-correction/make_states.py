"""The first steps of CFG teacher trajectories (training captions, w ~ U[2, 9], 25 DDIM steps): per state x_t, t,
w, the prompt, the conditional and unconditional outputs, and the step before's correction d_{k-1}
(zeros at the first step). Only steps 0..K-1 are kept: coherence.py showed the later ones are carried over.
Usage: python make_states.py N SEED K [threads] -> /tmp/recur/states-<seed>.pt"""
import sys, time, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent.parent / "fidelity-diagnosis"))
from harness import load_base, ddim
from pnpguide.embedded import shapes
from pnpguide.loading import encode_captions

n, seed, K = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
pipe = load_base(); unet = pipe.unet
captions = shapes.split_captions(n, split="train", seed=seed)
emb_all = encode_captions(pipe, captions + [""]); emb, empty = emb_all[:-1], emb_all[-1:]
g = torch.Generator().manual_seed(seed)
ws = 2 + 7 * torch.rand(n, generator=g)
out = {k: [] for k in ("x", "t", "w", "idx", "cond", "uncond", "d_prev")}
start = time.time()
for b in range(0, n, 128):
    e = emb[b:b + 128]; w = ws[b:b + 128].view(-1, 1, 1, 1); B = len(e)
    s = ddim(pipe, 25)
    x = torch.randn((B, 4, 16, 16), generator=g); d_prev = torch.zeros_like(x)
    for t in s.timesteps[:K]:
        x_in = s.scale_model_input(x, t)
        with torch.no_grad():
            u, c = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=torch.cat([empty.expand_as(e), e])).sample.chunk(2)
        for k, v in (("x", x_in), ("t", torch.full((B,), int(t))), ("w", w.flatten()), ("idx", torch.arange(b, b + B)),
                     ("cond", c), ("uncond", u), ("d_prev", d_prev)):
            out[k].append(v.clone())
        d_prev = c - u
        x = s.step(u + w * (c - u), t, x).prev_sample
    print(f"{b + B}/{n} trajectories, {time.time() - start:.0f} s", flush=True)
Path("/tmp/recur").mkdir(exist_ok=True)
torch.save({**{k: torch.cat(v) for k, v in out.items()}, "emb": emb, "captions": captions}, f"/tmp/recur/states-{seed}.pt")
