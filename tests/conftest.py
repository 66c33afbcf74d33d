"""Tiny random Stable Diffusion parts built in code (fully offline), like diffusers' get_dummy_components."""

import os

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import BertConfig, BertModel, BertTokenizer

from pnpguide.embedded import shapes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is as fast, deterministic, and does not spin on a busy machine

WORDS = sorted({"a", "an", "on", "background", "of", "small", "large", *shapes.SHAPES, *shapes.COLOURS, *shapes.BACKGROUNDS,
                *(w for r in shapes.RELATIONS for w in r.split())})


def tiny_unet(cross_attention_dim: int = 32, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(0)
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    return UNet2DConditionModel(**(config | overrides))


@pytest.fixture
def unet():
    return tiny_unet().eval()


@pytest.fixture
def tiny_components(tmp_path_factory):
    """Components for StableDiffusionPipeline: 16x16 images, 8x8x4 latents, a 2-layer BERT."""
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(vocab), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = BertModel(
        BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        add_pooling_layer=False,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing")
    return dict(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet().eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture
def tiny_base_dir(tiny_components, tmp_path):
    """The tiny components saved as a Stable Diffusion folder, as `--base` expects."""
    StableDiffusionPipeline(**tiny_components).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle on a black background\na blue square above a green triangle on a white background\n")
    return path


def distill_flags(base_dir, prompt_file, output_dir, **overrides) -> list[str]:
    """`pnpguide distill` flags for a run of a few seconds on the tiny base (trajectories, 1 thread)."""
    settings = dict(
        base=base_dir, source="trajectories", prompts=prompt_file, trajectories=8, trajectory_steps=4, max_steps=6,
        batch_size=4, lr_warmup_steps=0, checkpointing_steps=3, output_dir=output_dir,
    )
    flags = ["--threads", "1", "distill"]  # one thread: deterministic sums, and two ranks fit on two cores
    for name, value in (settings | overrides).items():
        flags += [f"--{name.replace('_', '-')}"] if value is True else [f"--{name.replace('_', '-')}", str(value)]
    return flags


def subprocess_env(**extra) -> dict:
    """Offline, and on the CPU even where a GPU is present: the tests compare weights exactly, and CPU kernels are
    deterministic while some CUDA ones (convolution backward) are not."""
    return os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"} | extra


@pytest.fixture(scope="session")
def sd15_dir(tmp_path_factory):
    """A random-weight SD 1.5-layout folder (CLIP, PNDM, SD's VAE), 64-px images; read-only: copy it to change it."""
    from checkpoints import build_sd15_folder

    return build_sd15_folder(tmp_path_factory.mktemp("sd15") / "model")


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    """A random-weight SDXL-layout folder (two CLIP encoders, Euler, size/crop conditioning); read-only."""
    from checkpoints import build_sdxl_folder

    return build_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "model")


def guide_inputs(batch=2, dim=32, size=8):
    """(sample, timesteps, prompt embeddings) for a guide on `tiny_unet()`, seeded."""
    torch.manual_seed(1)
    return torch.randn(batch, 4, size, size), torch.tensor([10, 700])[:batch], torch.randn(batch, 6, dim)


def randomised(guide):
    """The guide with every weight drawn at random (seeded): its zero-initialised outputs no longer are."""
    torch.manual_seed(2)
    for p in guide.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return guide
