"""Training-free experiment: extrapolate every cross-attention output from the empty prompt's towards the prompt's,
out = attn(null) + s * (attn(prompt) - attn(null)), with s = w, sqrt(w) or 1 + (w - 1) / 2, in one UNet pass."""
import sys, json, torch
import torch.nn.functional as F
torch.set_num_threads(2)
from pathlib import Path
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "fidelity-diagnosis"))
from harness import *


class ExtrapolatedCrossAttention:
    def __init__(self, owner):
        self.owner = owner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        assert encoder_hidden_states is not None and attn.group_norm is None and attn.spatial_norm is None
        b, c, hgt, wid = hidden_states.shape if hidden_states.ndim == 4 else (None,) * 4
        hs = hidden_states.view(b, c, -1).transpose(1, 2) if hidden_states.ndim == 4 else hidden_states
        q = attn.to_q(hs)
        heads = attn.heads
        def split(x): return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)
        def att(ctx):
            k, v = split(attn.to_k(ctx)), split(attn.to_v(ctx))
            return F.scaled_dot_product_attention(split(q), k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1))
        out_c = att(encoder_hidden_states)
        out_n = att(self.owner.null)
        s = getattr(self, "layer_scale", self.owner.scale)  # per_layer.py sets one layer's scale
        out = out_n + s * (out_c - out_n)
        out = out.transpose(1, 2).reshape(q.shape[0], -1, q.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        if hidden_states.ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, hgt, wid)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class AttentionGuide:
    def __init__(self, unet, null, scale_fn):
        self.null, self.scale_fn, self.scale = null, scale_fn, 1.0
        procs = {}
        for name, proc in unet.attn_processors.items():
            procs[name] = ExtrapolatedCrossAttention(self) if name.endswith("attn2.processor") else proc
        unet.set_attn_processor(procs)

    def guided_output(self, unet, x, t, e, w):
        self.scale = self.scale_fn(w, t)
        try:
            return unet(x, t, e).sample
        finally:
            self.scale = 1.0  # CFG and the unguided rows share this UNet


if __name__ == "__main__":
    mode = sys.argv[1]
    pipe = load_base()
    null = encode_captions(pipe, [""])
    fns = {"w": lambda w, t: w, "half": lambda w, t: 1 + 0.5 * (w - 1), "sqrt": lambda w, t: w ** 0.5}
    guide = AttentionGuide(pipe.unet, null, fns[mode])
    res = evaluate(pipe, guide, ws=(3.0, 5.0, 7.5), n=int(sys.argv[2]) if len(sys.argv) > 2 else 48)
    print(mode, summary(res), flush=True)
    json.dump({str(k): v for k, v in res.items()}, open(HERE / f"{mode}.json", "w"), indent=1)
