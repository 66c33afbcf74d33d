"""The random-weight SD 1.5 and SDXL folders the real-checkpoint tests use have the layouts users' folders have."""

import json

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline


def test_sd15_folder_has_sd15s_layout_and_classes(sd15_dir):
    index = json.loads((sd15_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (sd15_dir / "tokenizer").iterdir()}
    pipe = StableDiffusionPipeline.from_pretrained(str(sd15_dir), local_files_only=True)
    assert len(pipe.unet.config.block_out_channels) == 4 and pipe.vae_scale_factor == 8
    assert pipe.tokenizer("a red cat").input_ids[0] == pipe.tokenizer.bos_token_id


def test_sdxl_folder_has_two_text_encoders_and_size_conditioning(sdxl_dir):
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir), local_files_only=True)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
