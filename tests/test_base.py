import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import BertModel, BertTokenizer

from pnpguide.embedded import components, shapes
from pnpguide.loading import default_base_dir, load_pipeline
from pnpguide.embedded.base import BaseTrainConfig, VAETrainConfig, foreground_mask, train_base, train_vae


def test_pruned_text_encoder_encodes_dataset_captions_exactly_like_minilm():
    tokenizer, encoder = components.build_text_encoder()
    source = str(components.minilm_path())
    full_tokenizer, full_encoder = BertTokenizer.from_pretrained(source), BertModel.from_pretrained(source)
    captions = [shapes.sample_scene(i).caption for i in range(8)]
    ours = tokenizer(captions, padding="max_length", max_length=20, return_tensors="pt")
    theirs = full_tokenizer(captions, padding="max_length", max_length=20, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(encoder(**ours).last_hidden_state, full_encoder(**theirs).last_hidden_state)
    assert encoder.config.vocab_size < 5000


def test_foreground_mask_marks_objects_not_background():
    scene = shapes.sample_scene(0)
    pixels = shapes.image_to_tensor(shapes.render(scene))[None]
    mask = foreground_mask(pixels)
    assert mask.shape == (1, 1, 64, 64)
    assert 0.01 < mask.mean() < 0.5 and mask[0, 0, 0, 0] == 0


def test_train_vae_and_base_make_a_folder_stable_diffusion_loads_offline(tmp_path):
    train_vae(VAETrainConfig(output_dir=str(tmp_path / "vae"), max_steps=2, batch_size=4, lr_warmup_steps=0))
    config = BaseTrainConfig(
        output_dir=str(tmp_path / "base"), vae_dir=str(tmp_path / "vae" / "vae"), max_steps=2, batch_size=4, num_images=32, lr_warmup_steps=0
    )
    train_base(config)
    folder = tmp_path / "base" / "pipeline"
    for name in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / name).exists()
    assert not list(folder.rglob("*.bin"))  # safetensors only
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert pipe.unet.dtype == torch.float32  # stored in fp16, loaded for CPU use in fp32
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a black background", guidance_scale=7.5, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_pipeline(tmp_path)


@pytest.mark.integration
def test_embedded_model_loads_offline_with_plain_diffusers_and_follows_prompts():
    from pnpguide.embedded.adherence import adherence
    from pnpguide.evaluation.sampling import generate_images

    pipe = StableDiffusionPipeline.from_pretrained(str(default_base_dir()), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    captions = shapes.heldout_captions(12, objects=1)
    guided = generate_images(pipe, captions, 7.5, 25, seed=0, progress=False)
    unguided = generate_images(pipe, captions, 1.0, 25, seed=0, progress=False)
    assert adherence(guided, captions) >= 0.75
    assert adherence(guided, captions) > adherence(unguided, captions)
    assert np.asarray(guided[0]).shape == (64, 64, 3)
