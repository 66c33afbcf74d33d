"""FID with torchmetrics' FrechetInceptionDistance and a feature network that runs offline.

`shapes` (default) uses the shipped :class:`ShapesFeatureNet`; `inception` uses torchmetrics' Inception
with weights from a local file (users with real SD models; it needs `torch-fidelity`, which is not a
dependency). The real reference is the held-out shapes images of the model's style, or a folder of images.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image


FEATURES = ("shapes", "inception", "none")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REFERENCE_SEED = 31337  # the real images: held-out scenes, not the ones whose captions prompt the models
MIN_REFERENCE = 1000


def weights_id(model: torch.nn.Module) -> str:
    """A short digest of the weights, printed next to every FID: numbers from different networks never mix."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB -> (N, 3, H, W) float in [0, 1], what FrechetInceptionDistance(normalize=True) takes."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images])).permute(0, 3, 1, 2)


class FidScorer:
    """One FrechetInceptionDistance whose real statistics are kept while generated ones are reset per method."""

    def __init__(self, network: torch.nn.Module, name: str, image_size: int | None, reference_dir: str | None = None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.metric = FrechetInceptionDistance(feature=network, normalize=True, reset_real_features=False)
        self.name, self.network, self.image_size, self.reference_dir = name, network, image_size, reference_dir
        self._reference_key = None

    def describe(self) -> dict:
        return {"network": self.name, "weights": weights_id(self.network), "reference": self._reference_key}

    def set_reference(self, style: str, count: int, image_size: int) -> None:
        """Real statistics for this style (computed once per style): max(count, 1000) held-out images, or the folder."""
        if self.image_size is not None and image_size != self.image_size:
            raise ValueError(
                f"this model makes {image_size}x{image_size} images but the {self.name} FID features take "
                f"{self.image_size}x{self.image_size}; use --fid-features inception --inception-weights PATH --reference DIR, or --fid-features none"
            )
        key = f"folder {self.reference_dir}" if self.reference_dir else f"held-out shapes images, style {style}"
        if key == self._reference_key:
            return
        self.metric.reset_real_features = True  # a new style: drop the old reference too
        self.metric.reset()
        self.metric.reset_real_features = False
        for chunk in _chunks(self._reference_images(style, max(count, MIN_REFERENCE)), 256):
            self.metric.update(to_tensor(chunk), real=True)
        self._reference_key = key

    def _reference_images(self, style: str, count: int) -> list[Image.Image]:
        if self.reference_dir is not None:
            return read_image_folder(self.reference_dir, self.image_size)
        from ..embedded import shapes  # the shapes FID's real images: the embedded world's held-out scenes

        dataset = shapes.ShapesDataset(count, style=style, split="heldout", seed=REFERENCE_SEED)
        return [shapes.render(dataset.scene(i), style, noise_seed=i) for i in range(count)]

    @torch.no_grad()
    def score(self, images: list[Image.Image]) -> float:
        self.metric.reset()  # generated statistics only: reset_real_features=False keeps the reference
        for chunk in _chunks(images, 256):
            self.metric.update(to_tensor(chunk), real=False)
        return float(self.metric.compute())


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def read_image_folder(folder: str | Path, image_size: int | None) -> list[Image.Image]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference folder {str(folder)!r} does not exist")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < 2:
        raise ValueError(f"reference folder {folder} has {len(paths)} images; FID needs at least 2 (ideally thousands)")
    images = [Image.open(p).convert("RGB") for p in paths]
    if image_size is not None:
        wrong = [p.name for p, im in zip(paths, images) if im.size != (image_size, image_size)]
        if wrong:
            raise ValueError(f"{len(wrong)} reference images are not {image_size}x{image_size} (e.g. {wrong[0]}); resize them first")
    return images


def make_fid_scorer(kind: str, inception_weights: str | None = None, reference_dir: str | None = None) -> FidScorer | None:
    if kind not in FEATURES:
        raise ValueError(f"fid features must be one of {FEATURES}, got {kind!r}")
    if kind == "none":
        return None
    if kind == "shapes":
        from ..embedded.features import ShapesFeatureNet, default_features_dir

        folder = default_features_dir()
        network = ShapesFeatureNet.from_pretrained(str(folder), use_safetensors=True).eval()
        return FidScorer(network, "shapes-features", network.config.image_size, reference_dir)
    return FidScorer(_inception(inception_weights), "inception-v3", None, reference_dir)


def _inception(weights: str | None) -> torch.nn.Module:
    if weights is None or not Path(weights).is_file():
        raise FileNotFoundError(
            f"--fid-features inception needs --inception-weights pointing at a local FID Inception weights file "
            f"(pt_inception-2015-12-05); got {weights!r}. Nothing can be downloaded here."
        )
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as error:  # torchmetrics hides it when torch-fidelity is missing
        raise RuntimeError("Inception features need torch-fidelity: pip install torch-fidelity (on your own machine)") from error
    network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights)
    return _InceptionOnFloats(network)


class _InceptionOnFloats(torch.nn.Module):
    """torchmetrics' Inception takes uint8; FidScorer passes floats in [0, 1]."""

    num_features = 2048

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, images):
        return self.network((images * 255).round().to(torch.uint8))
