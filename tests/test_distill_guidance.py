import pytest
import torch

from pnpguide.base import encode_captions, load_pipeline
from pnpguide.distill_guidance import GuidanceDistillConfig, _noisy_batch, distillation_loss, teacher_trajectories, train_guide
from pnpguide.guide import GuideModel
from pnpguide.training import shard_rows


def _config(tiny_base_dir, prompt_file, tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "run"), base=str(tiny_base_dir), source="trajectories", prompts=str(prompt_file),
        trajectories=8, trajectory_steps=4, max_steps=40, batch_size=8, learning_rate=3e-3, lr_warmup_steps=0,
        checkpointing_steps=20, log_every=10,
    )
    return GuidanceDistillConfig(**(settings | overrides))


def test_distillation_brings_the_guided_unet_closer_to_the_teacher(tiny_base_dir, prompt_file, tmp_path):
    config = _config(tiny_base_dir, prompt_file, tmp_path)
    pipe = load_pipeline(tiny_base_dir)
    embeddings = encode_captions(pipe, [l for l in prompt_file.read_text().splitlines()] + [""])
    states = teacher_trajectories(pipe, embeddings, config)  # the states training sees
    rows = shard_rows(len(states.latents), config.batch_size, step=12345, seed=0, rank=0, world_size=1)
    batch = _noisy_batch(states, rows, pipe.scheduler, config, torch.Generator().manual_seed(12345))
    untrained = GuideModel.from_unet(pipe.unet, "tiny")
    trained = train_guide(config)
    with torch.no_grad():
        before = distillation_loss(pipe.unet, untrained, batch, embeddings).item()
        after = distillation_loss(pipe.unet, trained, batch, embeddings).item()
    assert after < 0.7 * before


def test_distillation_trains_only_the_guide_and_saves_it(tiny_base_dir, prompt_file, tmp_path):
    config = _config(tiny_base_dir, prompt_file, tmp_path, max_steps=3)
    before = {k: v.clone() for k, v in load_pipeline(tiny_base_dir).unet.state_dict().items()}
    train_guide(config)
    after = load_pipeline(tiny_base_dir).unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    saved = GuideModel.from_pretrained(tmp_path / "run" / "guide")
    assert tuple(saved.config.trained_guidance_range) == (2.0, 9.0)
    assert (tmp_path / "run" / "config.json").is_file() and (tmp_path / "run" / "log.jsonl").is_file()


@pytest.mark.parametrize("bad, match", [
    (dict(w_min=0.5), "1 <= w_min <= w_max <= 14"),
    (dict(w_min=9.0, w_max=2.0), "1 <= w_min <= w_max <= 14"),
    (dict(source="images"), "source must be one of"),
    (dict(size="medium"), "size must be one of"),
    (dict(max_steps=0), "max_steps must be >= 1"),
])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        GuidanceDistillConfig(**bad)


def test_empty_prompt_file_is_a_clear_error(tiny_base_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="has no prompts"):
        train_guide(_config(tiny_base_dir, empty, tmp_path))


def test_init_guide_continues_from_a_trained_guide(tiny_base_dir, prompt_file, tmp_path):
    start = GuideModel.from_unet(load_pipeline(tiny_base_dir).unet, "tiny")
    for p in start.parameters():
        torch.nn.init.normal_(p, std=0.05)
    start.save_pretrained(tmp_path / "start")
    guide = train_guide(_config(tiny_base_dir, prompt_file, tmp_path, init_guide=str(tmp_path / "start"), max_steps=1, learning_rate=1e-9))
    for (name, a), b in zip(guide.state_dict().items(), start.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_init_guide_for_another_unet_is_a_clear_error(tiny_base_dir, prompt_file, tmp_path):
    from conftest import tiny_unet

    GuideModel.from_unet(tiny_unet(block_out_channels=(32, 32)), "tiny").save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="block_out_channels"):
        train_guide(_config(tiny_base_dir, prompt_file, tmp_path, init_guide=str(tmp_path / "other")))
