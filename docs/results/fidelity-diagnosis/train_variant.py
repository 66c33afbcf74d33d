"""Train a guide variant for a fixed wall-clock budget; evaluate; write JSON.
Throwaway experiment script, not part of the package (the package path is `pnpguide distill`).
usage: train.py NAME --arch tiny|feat --source data|traj|mix --loss mse|rel --minutes M [--lr 1e-3] [--no-wscale]"""
import argparse, json, math, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from harness import *
from pnpguide.guide import GuideModel

p = argparse.ArgumentParser()
p.add_argument("name"); p.add_argument("--arch", default="tiny"); p.add_argument("--source", default="traj")
p.add_argument("--loss", default="rel"); p.add_argument("--minutes", type=float, default=12); p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--batch", type=int, default=32); p.add_argument("--no-wscale", action="store_true"); p.add_argument("--divisor", type=int, default=None)
p.add_argument("--threads", type=int, default=1); p.add_argument("--init", default=None); p.add_argument("--eval-ws", type=float, nargs="+", default=[3.0, 7.5])
a = p.parse_args()
torch.set_num_threads(a.threads)
out = Path("/tmp/fidruns") / a.name; out.mkdir(parents=True, exist_ok=True)
pipe = load_base(); unet = pipe.unet; sched = pipe.scheduler
T = sched.config.num_train_timesteps

# training prompts (training split captions) and their embeddings
ds = data.ShapesDataset(20000, seed=7)
captions = sorted({ds.scene(i).caption for i in range(20000)})
ek = CACHE / "train-emb.safetensors"
if not ek.exists():
    save_file({"emb": encode_captions(pipe, captions + [""]).contiguous()}, ek)
emb = load_file(ek)["emb"]; empty = emb[-1:]

def traj_states():
    k = CACHE / "traj-512.safetensors"
    if k.exists(): return load_file(k)
    g = torch.Generator().manual_seed(11); s = ddim(pipe, 25)
    X, I, Tt, W = [], [], [], []
    with torch.no_grad():
        for start in range(0, 512, 64):
            ids = torch.randint(len(emb) - 1, (64,), generator=g); w = 2 + 7 * torch.rand(64, generator=g)
            x = torch.randn((64, 4, 16, 16), generator=g)
            for t in s.timesteps:
                X.append(x.clone()); I.append(ids); Tt.append(t.expand(64)); W.append(w)
                x = s.step(cfg_noise_pred(unet, x, t, emb[ids], empty.expand(64, -1, -1), w), t, x).prev_sample
    d = {"x": torch.cat(X), "ids": torch.cat(I), "t": torch.cat(Tt), "w": torch.cat(W)}
    save_file(d, k); return d

def data_latents():
    k = CACHE / "data-20000.safetensors"
    if k.exists(): return load_file(k)
    c = cache_dataset(pipe, 20000, "flat", 7)
    lookup = {cap: i for i, cap in enumerate(captions)}
    unique = sorted({ds.scene(i).caption for i in range(20000)})
    assert unique == captions
    d = {"lat": c.latents.contiguous(), "ids": c.caption_ids.contiguous()}
    save_file(d, k); return d

need_traj = a.source in ("traj", "mix"); need_data = a.source in ("data", "mix")
TR = traj_states() if need_traj else None
DA = data_latents() if need_data else None

def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    parts = []
    n_traj = a.batch if a.source == "traj" else 0 if a.source == "data" else a.batch // 2
    if n_traj:
        r = torch.randint(len(TR["x"]), (n_traj,), generator=g)
        parts.append((TR["x"][r], TR["t"][r], TR["ids"][r], TR["w"][r]))
    n_data = a.batch - n_traj
    if n_data:
        r = torch.randint(len(DA["lat"]), (n_data,), generator=g)
        t = torch.randint(0, T, (n_data,), generator=g)
        x = sched.add_noise(DA["lat"][r], torch.randn((n_data, 4, 16, 16), generator=g), t)
        parts.append((x, t, DA["ids"][r], 2 + 7 * torch.rand(n_data, generator=g)))
    return [torch.cat(z) for z in zip(*parts)]

torch.manual_seed(0)
guide = GuideModel.from_unet(unet, "tiny", reads={"tiny": "latent", "feat": "unet_features"}[a.arch], scale_by_guidance=not a.no_wscale)
if a.init:
    guide.load_state_dict(load_file(a.init))
guide.train()
nparams = sum(p.numel() for p in guide.parameters())
opt = torch.optim.AdamW(guide.parameters(), lr=a.lr, weight_decay=1e-2)
gap_ema = torch.zeros(20)
budget = a.minutes * 60; t0 = time.time(); step = 0; log = []
while time.time() - t0 < budget:
    frac = (time.time() - t0) / budget
    for group in opt.param_groups:
        group["lr"] = a.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * frac))
    x, t, ids, w = batch(step)
    c = emb[ids]
    with torch.no_grad():
        out_ = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([empty.expand_as(c), c])).sample
        unc, cond = out_.chunk(2)
        target = cfg_combine(unc, cond, w)
    pred = guided(unet, guide, x, t, c, w)
    err = ((pred - target) ** 2).flatten(1).mean(1)
    if a.loss == "tnorm":  # each sample's error over the running mean gap of its timestep bucket (not its own gap)
        gap = ((target - cond) ** 2).flatten(1).mean(1)
        bucket = (t.long() * 20 // T).clamp(0, 19)
        for b in bucket.unique():
            gap_ema[b] = 0.9 * gap_ema[b] + 0.1 * gap[bucket == b].mean() if gap_ema[b] > 0 else gap[bucket == b].mean()
        loss = (err / gap_ema[bucket]).mean()
    elif a.loss == "rel":
        gap = ((target - cond) ** 2).flatten(1).mean(1)
        loss = (err / (gap + 1e-3)).mean()
    else:
        loss = err.mean()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(guide.parameters(), 1.0); opt.step()
    step += 1
    if step % 200 == 0:
        save_file({k: v.contiguous() for k, v in guide.state_dict().items()}, out / f"guide-{step}.safetensors")
    if step % 50 == 0:
        log.append({"step": step, "loss": loss.item(), "s": round(time.time() - t0)})
        print(json.dumps(log[-1]), flush=True)
guide.eval()
save_file({k: v.contiguous() for k, v in guide.state_dict().items()}, out / "guide.safetensors")
if hasattr(guide, "save_pretrained"): guide.save_pretrained(out / "guide")
res = evaluate(pipe, guide, ws=tuple(a.eval_ws))
print(a.name, "steps", step, "params", nparams, summary(res), flush=True)
json.dump({"args": vars(a), "steps": step, "params": nparams, "log": log, "eval": {str(k): v for k, v in res.items()}}, open(out / "result.json", "w"), indent=1)
