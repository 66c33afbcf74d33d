"""Teacher trajectories for the output-space experiment: at every state of CFG sampling (training captions,
w ~ U[2, 9], 25 DDIM steps), keep x_t, t, w, the prompt, the conditional and unconditional outputs and the
conditional pass's last decoder features (the input of conv_norm_out). Writes /tmp/outguide/states-<seed>.pt."""
import sys, time, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent.parent / "fidelity-diagnosis"))
from harness import load_base, ddim, encode_captions
from pnpguide.embedded import shapes

torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
n, seed = int(sys.argv[1]), int(sys.argv[2])
pipe = load_base(); unet = pipe.unet
captions = shapes.split_captions(n, split="train", seed=seed)
emb_all = encode_captions(pipe, captions + [""]); emb, empty = emb_all[:-1], emb_all[-1:]
g = torch.Generator().manual_seed(seed)
ws = 2 + 7 * torch.rand(n, generator=g)
feats = {}
unet.conv_norm_out.register_forward_pre_hook(lambda m, a: feats.__setitem__("f", a[0]))
out = {k: [] for k in ("x", "t", "w", "idx", "cond", "uncond", "feat")}
start = time.time()
for b in range(0, n, 64):
    e = emb[b:b + 64]; w = ws[b:b + 64].view(-1, 1, 1, 1); B = len(e)
    s = ddim(pipe, 25)
    x = torch.randn((B, 4, 16, 16), generator=g)
    for t in s.timesteps:
        x_in = s.scale_model_input(x, t)
        with torch.no_grad():
            o = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=torch.cat([empty.expand_as(e), e])).sample
        u, c = o.chunk(2)
        out["x"].append(x_in.clone()); out["t"].append(torch.full((B,), int(t))); out["w"].append(w.flatten())
        out["idx"].append(torch.arange(b, b + B)); out["cond"].append(c); out["uncond"].append(u)
        out["feat"].append(feats["f"][B:].half())
        x = s.step(u + w * (c - u), t, x).prev_sample
    print(f"{b + B}/{n} trajectories, {time.time() - start:.0f} s", flush=True)
Path("/tmp/outguide").mkdir(exist_ok=True)
torch.save({**{k: torch.cat(v) for k, v in out.items()}, "emb": emb, "captions": captions}, f"/tmp/outguide/states-{seed}.pt")
