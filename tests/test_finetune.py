import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from pnpguide.loading import load_pipeline
from pnpguide.embedded.finetune import FinetuneConfig, finetune


@pytest.fixture
def tiny_base_dir(tiny_components, tmp_path):
    StableDiffusionPipeline(**tiny_components).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _config(base, tmp_path, method):
    return FinetuneConfig(
        output_dir=str(tmp_path / method), base=str(base), style="pastel", method=method, max_steps=3, batch_size=4,
        num_images=16, lr_warmup_steps=0, learning_rate=1e-2,
    )


def _sample(pipe):
    return pipe("a red circle on a black background", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_full_finetune_saves_a_complete_folder_with_a_changed_unet(tiny_base_dir, tmp_path):
    folder = finetune(_config(tiny_base_dir, tmp_path, "full"))
    base, tuned = load_pipeline(tiny_base_dir), load_pipeline(folder)
    assert not torch.equal(base.unet.conv_in.weight, tuned.unet.conv_in.weight)
    # the frozen VAE is saved again unchanged, up to the fp16 storage
    assert torch.equal(base.vae.decoder.conv_out.weight.half(), tuned.vae.decoder.conv_out.weight.half())


def test_lora_finetune_loads_with_diffusers_lora_loading_and_changes_images(tiny_base_dir, tmp_path):
    folder = finetune(_config(tiny_base_dir, tmp_path, "lora"))
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    plain, with_lora = load_pipeline(tiny_base_dir), load_pipeline(tiny_base_dir, lora=folder)
    assert abs(_sample(plain) - _sample(with_lora)).max() > 1e-4


@pytest.mark.parametrize("bad, match", [(dict(style="sepia"), "unknown style"), (dict(method="dora"), "method must be")])
def test_bad_finetune_config_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**bad)


def test_a_concept_lora_with_prior_preservation_trains_on_the_new_shape_and_the_bases_own_samples(tiny_base_dir, tmp_path):
    """DreamBooth-style: the concept's images and, half of every batch, the base's own samples of its captions, made
    once and kept in the output folder for a resumed run."""
    from safetensors import safe_open

    from pnpguide.embedded.finetune import PRIOR_FILE

    config = _config(tiny_base_dir, tmp_path, "lora")
    config.style, config.concept, config.prior_images = "flat", "bar", 6
    folder = finetune(config)
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    with safe_open(str(tmp_path / "lora" / PRIOR_FILE), framework="pt") as prior:
        assert prior.get_tensor("latents").shape == (6, 4, 32, 32)  # 64-px shapes images through the tiny VAE, as the data
        assert all(" bar" not in caption for caption in json.loads(prior.metadata()["captions"]))


@pytest.mark.parametrize("bad, match", [(dict(concept="star"), "unknown concept"), (dict(prior_images=1), "prior_images must be >= 2"),
                                        (dict(prior_guidance_scale=0.5), "prior_guidance_scale must be >= 1")])
def test_bad_concept_settings_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**bad)
