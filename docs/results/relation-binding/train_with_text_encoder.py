"""Throwaway: continue a base with its text encoder trained too (as diffusers' --train_text_encoder does).

Tests whether a text encoder that may learn word order lets the UNet place the first-named object.
"""
import sys, torch
from pathlib import Path
from pnpguide.embedded import shapes
from pnpguide.loading import load_pipeline, save_pipeline
from pnpguide.embedded.base import diffusion_loss, encode_images
from pnpguide.training import TrainingConfig, run_training, copy_ema_into, save_config

base, out, steps, lr = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
torch.set_num_threads(2)
config = TrainingConfig(output_dir=out, max_steps=steps, batch_size=64, learning_rate=lr, lr_warmup_steps=100,
                        use_ema=True, seed=7, checkpointing_steps=800)
save_config(config, out)
pipe = load_pipeline(base)
pipe.vae.requires_grad_(False)
dataset = shapes.ShapesDataset(40000, style="flat", seed=8)
captions = [dataset.scene(i).caption for i in range(len(dataset))]
unique = sorted(set(captions)) + [""]
lookup = {c: i for i, c in enumerate(unique)}
tokens = pipe.tokenizer(unique, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
caption_ids = torch.tensor([lookup[c] for c in captions])
latents = encode_images(pipe.vae, dataset)

class Both(torch.nn.Module):
    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
    def forward(self, *a, **k):
        return self.unet(*a, **k)

model = Both(pipe.unet, pipe.text_encoder.train())

def make_batch(step, generator):
    rows = torch.randint(len(latents), (64,), generator=generator)
    ids = caption_ids[rows].clone()
    ids[torch.rand(64, generator=generator) < 0.1] = len(unique) - 1
    return {"latents": latents[rows], "ids": ids, "generator": generator}

def compute_loss(model, batch):
    ids = batch["ids"]
    embeds = model.text_encoder(tokens.input_ids[ids], attention_mask=tokens.attention_mask[ids])[0]
    return diffusion_loss(model.unet, pipe.scheduler, batch["latents"], embeds, batch["generator"])

model, ema = run_training(config, model, make_batch, compute_loss, description="train-unet+te")
model = copy_ema_into(model, ema).eval()
pipe.unet, pipe.text_encoder = model.unet, model.text_encoder
save_pipeline(pipe, Path(out) / "pipeline")
print("saved", Path(out) / "pipeline")
