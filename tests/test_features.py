"""The FID feature network: labels, degradations, input checks and a short training run."""

import pytest
import torch

from pnpguide.embedded import shapes
from pnpguide.embedded.features import (
    ATTRIBUTES, DEGRADATIONS, FeatureTrainConfig, ShapesFeatureNet, degrade, feature_batch, scene_labels, train_features,
)


def test_scene_labels_name_every_attribute_of_a_two_object_scene():
    scene = next(s for s in (shapes.sample_scene(i) for i in range(50)) if len(s.objects) == 2)
    labels = scene_labels(scene, "pastel")
    decoded = {name: ATTRIBUTES[name][index] for name, index in labels.items()}
    assert decoded["objects"] == "2" and decoded["relation"] == scene.relation and decoded["style"] == "pastel"
    assert (decoded["shape_2"], decoded["colour_2"]) == (scene.objects[1].shape, scene.objects[1].colour)


def test_degrade_leaves_clean_images_alone_and_changes_the_others():
    images = feature_batch(0, len(DEGRADATIONS), torch.Generator().manual_seed(0), 0.0, 0)["images"]
    out = degrade(images, torch.arange(len(DEGRADATIONS)), torch.Generator().manual_seed(1))
    assert torch.equal(out[0], images[0])
    for kind in range(1, len(DEGRADATIONS)):
        assert (out[kind] - images[kind]).abs().mean() > 1e-3, DEGRADATIONS[kind]
    assert out.min() >= 0 and out.max() <= 1


def test_feature_network_rejects_other_resolutions():
    with pytest.raises(ValueError, match="takes 64x64 images, got \\(32, 32\\)"):
        ShapesFeatureNet()(torch.rand(1, 3, 32, 32))


def test_training_lowers_the_loss_and_saves_a_loadable_network(tmp_path):
    config = FeatureTrainConfig(output_dir=str(tmp_path), max_steps=30, batch_size=16, lr_warmup_steps=0, log_every=1, num_features=16)
    model = train_features(config)
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) < sum(losses[:5])
    loaded = ShapesFeatureNet.from_pretrained(str(tmp_path / "features"), use_safetensors=True)
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded(x).shape == (2, 16) and loaded.num_features == 16
