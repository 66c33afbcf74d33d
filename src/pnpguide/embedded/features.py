"""The FID feature network: a small CNN trained on the shapes data, because Inception weights cannot be downloaded here.

FID compares feature statistics of generated and real images, so the features must notice what makes
a sample good. This network learns every attribute the captions name (background, shapes, colours,
object count, relation) plus the style, and whether and how an image was degraded (blur, noise, washed
out colours), so its features move with content *and* image quality. FID numbers from different feature
networks are never comparable: every report names the network and a digest of its weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from . import shapes
from ..loading import ASSETS_DIR
from ..config_checks import check_fraction
from ..run_folder import training_run
from ..training import TrainingConfig, run_training

DEGRADATIONS = ("none", "blur", "noise", "washed-out")
ATTRIBUTES = {  # head name -> classes; "-" stands for "no second object"
    "background": list(shapes.BACKGROUNDS),
    "objects": ["1", "2"],
    "shape_1": list(shapes.SHAPES),
    "colour_1": list(shapes.COLOURS),
    "shape_2": [*shapes.SHAPES, "-"],
    "colour_2": [*shapes.COLOURS, "-"],
    "relation": [*shapes.RELATIONS, "-"],
    "style": list(shapes.STYLES),
    "degradation": list(DEGRADATIONS),
}


def default_features_dir() -> Path:
    return ASSETS_DIR / "features" / "shapes"


class ShapesFeatureNet(ModelMixin, ConfigMixin):
    """64x64 RGB in [0, 1] -> `num_features` features; the attribute heads only exist for training.

    torchmetrics' FrechetInceptionDistance takes it as `feature=`: it reads `num_features` and passes
    images through unchanged when `normalize=True` (floats in [0, 1]).
    """

    @register_to_config
    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), num_features: int = 64, image_size: int = shapes.IMAGE_SIZE):
        super().__init__()
        layers, width = [], 3
        for out in channels:  # each stage halves the resolution: 64 -> 32 -> 16 -> 8
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            layers += [nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            width = out
        self.encoder = nn.Sequential(*layers)
        self.project = nn.Linear(width, num_features)
        self.heads = nn.ModuleDict({name: nn.Linear(num_features, len(classes)) for name, classes in ATTRIBUTES.items()})
        self.num_features = num_features  # a plain attribute: torchmetrics looks it up

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.config.image_size, self.config.image_size):
            raise ValueError(
                f"the shapes feature network takes {self.config.image_size}x{self.config.image_size} images, got "
                f"{tuple(images.shape[-2:])}; for other models use --fid-features inception --inception-weights PATH"
            )
        return self.project(self.encoder(images.float()).mean(dim=(2, 3)))

    def attribute_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = F.silu(self(images))
        return {name: head(features) for name, head in self.heads.items()}


def scene_labels(scene: shapes.Scene, style: str) -> dict[str, int]:
    first, second = scene.objects[0], scene.objects[1] if len(scene.objects) > 1 else None
    values = {
        "background": scene.background,
        "objects": str(len(scene.objects)),
        "shape_1": first.shape,
        "colour_1": first.colour,
        "shape_2": second.shape if second else "-",
        "colour_2": second.colour if second else "-",
        "relation": scene.relation or "-",
        "style": style,
    }
    return {name: ATTRIBUTES[name].index(value) for name, value in values.items()}


def degrade(images: torch.Tensor, kinds: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply DEGRADATIONS[kind] per image (strength drawn at random): the features must tell good from bad."""
    out = images.clone()
    n, _, h, w = images.shape
    strength = torch.rand(n, generator=generator)
    for i in range(n):
        kind = DEGRADATIONS[int(kinds[i])]
        if kind == "blur":  # what a weak decoder or a blobby sample looks like
            size = int(h * (0.25 + 0.35 * strength[i]))
            small = F.interpolate(images[i : i + 1], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out[i] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
        elif kind == "noise":
            out[i] = images[i] + (0.03 + 0.12 * strength[i]) * torch.randn(images[i].shape, generator=generator)
        elif kind == "washed-out":
            amount = 0.15 + 0.4 * strength[i]
            out[i] = (1 - amount) * images[i] + amount * images[i].mean(dim=(1, 2), keepdim=True)
    return out.clamp(0, 1)


@dataclass
class FeatureTrainConfig(TrainingConfig):
    output_dir: str = "runs/features"
    max_steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 2e-3
    lr_warmup_steps: int = 50
    num_features: int = 64  # feature dimension FID is computed in
    degraded_fraction: float = 0.5  # share of training images given a random degradation

    def __post_init__(self):
        super().__post_init__()
        check_fraction(self, "degraded_fraction")


def feature_batch(start: int, count: int, generator: torch.Generator, degraded_fraction: float, seed: int, split: str = "train") -> dict:
    """Scenes in random styles, a share of them degraded, with one label per attribute head."""
    styles = torch.randint(len(shapes.STYLES), (count,), generator=generator).tolist()
    images, labels = [], {name: [] for name in ATTRIBUTES}
    for offset, style_index in enumerate(styles):
        style, scene = shapes.STYLES[style_index], shapes.sample_scene(start + offset, seed, split)
        images.append((shapes.image_to_tensor(shapes.render(scene, style, noise_seed=start + offset)) + 1) / 2)
        for name, value in scene_labels(scene, style).items():
            labels[name].append(value)
    kinds = torch.randint(1, len(DEGRADATIONS), (count,), generator=generator)
    kinds[torch.rand(count, generator=generator) >= degraded_fraction] = 0
    labels["degradation"] = kinds.tolist()
    return {"images": degrade(torch.stack(images), kinds, generator), **{k: torch.tensor(v) for k, v in labels.items()}}


@training_run
def train_features(config: FeatureTrainConfig) -> ShapesFeatureNet:
    """Train the FID feature network on every style; saved to `output_dir/features`."""
    torch.manual_seed(config.seed)
    model = ShapesFeatureNet(num_features=config.num_features)

    def make_batch(step, generator):
        return feature_batch(step * config.batch_size, config.batch_size, generator, config.degraded_fraction, config.seed)

    def compute_loss(net, batch):
        logits = net.attribute_logits(batch["images"])
        return sum(F.cross_entropy(logits[name], batch[name]) for name in ATTRIBUTES) / len(ATTRIBUTES)

    model, _ = run_training(config, model, make_batch, compute_loss, description="train-features")
    model.eval().save_pretrained(Path(config.output_dir) / "features", safe_serialization=True)
    return model


@torch.no_grad()
def attribute_accuracy(model: ShapesFeatureNet, images: int = 512, seed: int = 4321) -> dict[str, float]:
    """Held-out accuracy of each head (degradations included): evidence that the features see the content."""
    batch = feature_batch(0, images, torch.Generator().manual_seed(seed), 0.5, seed, split="heldout")
    logits = model.eval().attribute_logits(batch["images"])
    return {name: float((logits[name].argmax(-1) == batch[name]).float().mean()) for name in ATTRIBUTES}
