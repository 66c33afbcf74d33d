"""An output-space guide for the experiment: a small network that reads x_t, the UNet's conditional output (and
optionally its last decoder features), t and the prompt, and predicts CFG's correction d = cond - uncond, so that
one UNet pass gives cond + (w - 1) * d_hat. Zero-initialised output: untrained, it is the unguided UNet."""
import math, time

import torch
from torch import nn
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D, Downsample2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel


class Corrector(nn.Module):
    def __init__(self, in_channels=8, width=64, context_dim=384, heads=4, groups=16):
        super().__init__()
        self.in_channels = in_channels
        tdim = width * 4
        self.time_proj = Timesteps(width, True, 0); self.time_embed = TimestepEmbedding(width, tdim)
        res = lambda: ResnetBlock2D(in_channels=width, out_channels=width, temb_channels=tdim, groups=groups)
        attn = lambda: Transformer2DModel(heads, width // heads, in_channels=width, cross_attention_dim=context_dim, norm_num_groups=groups)
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.res1, self.down = res(), Downsample2D(width, use_conv=True)
        self.res2, self.attn2, self.res3, self.attn3 = res(), attn(), res(), attn()
        self.up = Upsample2D(width, use_conv=True)
        self.merge = nn.Conv2d(2 * width, width, 1)
        self.res4, self.attn4 = res(), attn()
        self.norm_out = nn.GroupNorm(groups, width); self.conv_out = nn.Conv2d(width, 4, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight); nn.init.zeros_(self.conv_out.bias)

    def forward(self, inputs, t, context):
        temb = self.time_embed(self.time_proj(t.flatten().expand(inputs.shape[0]).float()))
        h = self.res1(self.conv_in(inputs), temb); skip = h
        h = self.res2(self.down(h), temb); h = self.attn2(h, encoder_hidden_states=context).sample
        h = self.res3(h, temb); h = self.attn3(h, encoder_hidden_states=context).sample
        h = self.merge(torch.cat([self.up(h), skip], 1))
        h = self.attn4(self.res4(h, temb), encoder_hidden_states=context).sample
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


class OutputGuide:
    """guided_output(unet, x, t, e, w) for the harness: one UNet pass, then the corrector."""
    def __init__(self, net, reads_features=False):
        self.net, self.reads_features, self.feat = net.eval(), reads_features, None
    def guided_output(self, unet, x, t, e, w):
        handle = unet.conv_norm_out.register_forward_pre_hook(lambda m, a: setattr(self, "feat", a[0])) if self.reads_features else None
        cond = unet(x, t, e).sample
        if handle: handle.remove()
        inputs = torch.cat([x, cond] + ([self.feat] if self.reads_features else []), 1)
        w = w.view(-1, 1, 1, 1) if torch.is_tensor(w) else w
        return cond + (w - 1) * self.net(inputs, torch.as_tensor(t), e)


def train(net, batch_loss, steps, lr, minutes=1e9):
    """The experiments' loop: AdamW, 100 warm-up steps then a cosine, gradients clipped at 1, a log line every 100
    steps, stopped after `minutes`. batch_loss() -> the loss of a freshly drawn batch. Returns the steps taken."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1, (k + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    start, log, step = time.time(), [], -1
    for step in range(steps):
        loss = batch_loss()
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step(); sched.step()
        log.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {sum(log[-100:]) / len(log[-100:]):.4f} ({time.time() - start:.0f} s)", flush=True)
        if (time.time() - start) / 60 > minutes:
            print(f"stopped at step {step} after {minutes} min", flush=True); break
    return step + 1
