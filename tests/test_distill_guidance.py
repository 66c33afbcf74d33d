import json

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors import safe_open
from safetensors.torch import load_file

from pnpguide.conditioning import encode_negative, encode_prompts
from pnpguide.loading import load_pipeline
from pnpguide.distill_guidance import (
    GAP_FLOOR, GuidanceDistillConfig, _noisy_batch, distillation_loss, squared_error, teacher_targets, timestep_bucket,
    timestep_gap_table, train_guide,
)
from pnpguide.guide import GuideModel, OutputGuide, ResidualGuide
from pnpguide.sources import teacher_trajectories
from pnpguide.shards import ShardPool
from pnpguide.teacher import cfg_and_conditional, cfg_combine, output_guided
from pnpguide.training import make_accelerator, shard_rows


def _config(tiny_base_dir, prompt_file, tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "run"), base=str(tiny_base_dir), source="trajectories", prompts=str(prompt_file),
        trajectories=8, trajectory_steps=4, max_steps=40, batch_size=8, learning_rate=3e-3, lr_warmup_steps=0,
        checkpointing_steps=20, log_every=10,
    )
    return GuidanceDistillConfig(**(settings | overrides))


def _held_out_batch(pipe, prompt_file, config, tmp_path) -> tuple[dict, object]:
    """A batch of the trajectory states training sees (collected apart from the run), and the negative conditioning."""
    prompts = prompt_file.read_text().splitlines()
    states = teacher_trajectories(pipe, prompts, tmp_path / "held-out", config, make_accelerator(config))
    rows = shard_rows(len(states), config.batch_size, step=12345, seed=0, rank=0, world_size=1)
    batch = _noisy_batch(states.rows(rows), pipe.scheduler, config, torch.Generator().manual_seed(12345))
    batch["conditioning"] = encode_prompts(pipe, batch.pop("prompts"), "cpu", 16)
    return batch, encode_negative(pipe, "cpu", 16)


def test_distillation_brings_the_guided_unet_closer_to_the_teacher(tiny_base_dir, prompt_file, tmp_path):
    config = _config(tiny_base_dir, prompt_file, tmp_path, design="residual")
    pipe = load_pipeline(tiny_base_dir)
    batch, negative = _held_out_batch(pipe, prompt_file, config, tmp_path)
    untrained = ResidualGuide.from_unet(pipe.unet)
    trained = train_guide(config)
    with torch.no_grad():
        before = distillation_loss(pipe.unet, untrained, batch, negative).item()
        after = distillation_loss(pipe.unet, trained, batch, negative).item()
    assert after < 0.7 * before
    saved = json.loads((tmp_path / "run" / "guide" / "config.json").read_text())
    assert saved["_class_name"] == "ResidualGuide" and "trained_first_steps" not in saved  # only an output guide has the field


def test_teacher_states_carry_the_teachers_outputs_there(tiny_base_dir, prompt_file, tmp_path):
    """The outputs recorded with each trajectory state are what the teacher computes at that state, so training on
    them needs no teacher call."""
    config = _config(tiny_base_dir, prompt_file, tmp_path)
    pipe = load_pipeline(tiny_base_dir)
    batch, negative = _held_out_batch(pipe, prompt_file, config, tmp_path)
    recorded = teacher_targets(pipe.unet, batch, negative)
    computed = teacher_targets(pipe.unet, {k: v for k, v in batch.items() if k not in ("unconditional", "conditional")}, negative)
    assert batch["conditional"] is not None and batch["conditional"].abs().sum() > 0
    for a, b in zip(recorded, computed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_an_output_guide_trains_on_teacher_states_without_calling_the_teacher(tiny_base_dir, prompt_file, tmp_path, monkeypatch):
    import pnpguide.distill_guidance as distill_guidance

    config = _config(tiny_base_dir, prompt_file, tmp_path, max_steps=3, loss_weighting="timestep")
    train_guide(config)  # writes the trajectories (the teacher runs there)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was called at a recorded state")

    monkeypatch.setattr(distill_guidance, "cfg_and_conditional", no_teacher)
    train_guide(GuidanceDistillConfig(**(vars(config) | dict(max_steps=6, resume="latest"))))  # the shards are reused
    # with negatives (a negative head), each teacher run samples CFG with its own negative and records it: training calls
    # no teacher either
    train_guide(GuidanceDistillConfig(**(vars(config) | dict(output_dir=str(tmp_path / "neg"), init_guide=str(tmp_path / "run" / "guide"),
                                                              negative_head=True, negative_rate=1.0, resume=None))))
    with safe_open(str(tmp_path / "neg" / "trajectories" / "shard-00000.safetensors"), framework="pt") as f:
        assert "negative_ids" in f.keys()
    with safe_open(str(tmp_path / "run" / "trajectories" / "shard-00000.safetensors"), framework="pt") as f:
        assert "negative_ids" not in f.keys()  # runs without negatives record none (their unconditional pass: the empty prompt's)


def test_an_output_guides_loss_is_in_units_of_cond_minus_uncond(tiny_base_dir, prompt_file, tmp_path):
    """An output guide predicts cond - uncond, which does not depend on w: the same prediction error weighs the
    same at any w (in output space it grows with (w - 1)^2), and a residual guide's loss stays in output space."""
    config = _config(tiny_base_dir, prompt_file, tmp_path)
    pipe = load_pipeline(tiny_base_dir)
    batch, negative = _held_out_batch(pipe, prompt_file, config, tmp_path)
    output_guide = OutputGuide.from_unet(pipe.unet)  # untrained: predicts 0, error |d|^2 (w - 1)^2
    residual_guide = ResidualGuide.from_unet(pipe.unet)
    losses = {}
    for w in (2.0, 8.0):
        at_w = batch | {"guidance_scale": torch.full_like(batch["guidance_scale"], w)}
        with torch.no_grad():
            losses[w] = [distillation_loss(pipe.unet, guide, at_w, negative).item() for guide in (output_guide, residual_guide)]
    assert losses[2.0][0] == pytest.approx(losses[8.0][0], rel=1e-4)
    assert losses[8.0][1] == pytest.approx(49 * losses[2.0][1], rel=1e-3)


def test_distillation_trains_only_the_guide_and_saves_it(tiny_base_dir, prompt_file, tmp_path):
    config = _config(tiny_base_dir, prompt_file, tmp_path, max_steps=3)
    before = {k: v.clone() for k, v in load_pipeline(tiny_base_dir).unet.state_dict().items()}
    train_guide(config)
    after = load_pipeline(tiny_base_dir).unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    saved = GuideModel.from_pretrained(tmp_path / "run" / "guide")
    assert tuple(saved.config.trained_guidance_range) == (2.0, 9.0)
    assert (tmp_path / "run" / "config.json").is_file() and (tmp_path / "run" / "log.jsonl").is_file()
    # an output guide on the teacher's first steps (here all 4 of its 4-step runs), its correction carried after them
    assert isinstance(saved, OutputGuide) and saved.config.trained_first_steps == 4
    assert saved.correction_carry is not None and saved.correction_carry.full_steps == 4 and len(saved.correction_carry.timesteps) == 4
    assert saved.policy.carry == saved.correction_carry
    assert (tmp_path / "run" / "guide" / "correction_carry.json").is_file() and (tmp_path / "run" / "guide" / "README.md").is_file()


@pytest.mark.parametrize("bad, match", [
    (dict(w_min=0.5), "1 <= w_min <= w_max <= 14"),
    (dict(w_min=9.0, w_max=2.0), "1 <= w_min <= w_max <= 14"),
    (dict(source="pictures"), "source must be one of"),
    (dict(design="medium"), "design must be one of"),
    (dict(loss_weighting="relative"), "loss_weighting must be one of"),
    (dict(max_steps=0), "max_steps must be >= 1"),
    (dict(source="shapes", trajectory_first_steps=2), "use it with source 'trajectories', not 'shapes'"),
    (dict(source="trajectories", trajectory_first_steps=26), r"between 1 and trajectory_steps \(25\), got 26"),
    (dict(source="shapes", validation_trajectories=8), "use it with source 'trajectories', not 'shapes'"),
    (dict(source="trajectories", validation_trajectories=0), "whole number of teacher runs >= 1, got 0"),
])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        GuidanceDistillConfig(**bad)


def test_trajectory_first_steps_trains_on_those_states_only_and_says_so(tiny_base_dir, prompt_file, tmp_path, monkeypatch):
    import pnpguide.distill_guidance as distill_guidance

    seen = []
    loss = distill_guidance.distillation_loss
    monkeypatch.setattr(distill_guidance, "distillation_loss", lambda unet, guide, batch, *rest: seen.append(batch["timesteps"]) or loss(unet, guide, batch, *rest))
    table = distill_guidance.timestep_gap_table
    bands = []
    monkeypatch.setattr(distill_guidance, "timestep_gap_table", lambda *args, **kwargs: bands.append((args[4], kwargs["per_unit_guidance"])) or table(*args, **kwargs))
    guide = train_guide(_config(tiny_base_dir, prompt_file, tmp_path, trajectory_first_steps=2, max_steps=4,
                                loss_weighting="timestep"))
    schedule = DDIMScheduler.from_config(load_pipeline(tiny_base_dir).scheduler.config)  # the teacher's trajectories' scheduler
    schedule.set_timesteps(4)
    assert set(torch.cat(seen).tolist()) == set(schedule.timesteps[:2].tolist())  # both first steps, none of the later two
    # the loss weights each of the schedule's timesteps by its own mean gap, in the output guide's unit (cond - uncond)
    assert bands == [(1000, True)]
    shards = sorted((tmp_path / "run" / "trajectories").glob("shard-*.safetensors"))
    rows = sum(load_file(shard)["timesteps"].numel() for shard in shards)
    assert rows == 2 * _config(tiny_base_dir, prompt_file, tmp_path).trajectories  # the teacher stopped after the two steps
    assert GuideModel.from_pretrained(tmp_path / "run" / "guide").config.trained_first_steps == guide.config.trained_first_steps == 2


def test_validation_trajectories_are_held_out_and_their_loss_is_logged_at_each_checkpoint(tiny_base_dir, prompt_file, tmp_path):
    """Held-out teacher runs (other noise) are scored before training and at every checkpoint; with EMA the figure
    is the EMA weights', the ones saved: the last one equals the saved guide's loss over every held-out state."""
    config = _config(tiny_base_dir, prompt_file, tmp_path, trajectory_first_steps=2, max_steps=4,
                     checkpointing_steps=2, log_every=1, validation_trajectories=3, use_ema=True, loss_weighting="none")
    guide = train_guide(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    validation = [(row["step"], row["validation_loss"]) for row in rows if "validation_loss" in row]
    assert [step for step, _ in validation] == [0, 2, 4] and all("loss" not in row for row in rows if "validation_loss" in row)

    pipe = load_pipeline(tiny_base_dir)
    held_out = ShardPool(tmp_path / "run" / "validation-trajectories", prompt_file.read_text().splitlines())
    states = held_out.rows(torch.arange(len(held_out)))
    assert len(held_out) == 3 * 2  # three runs, their first two states
    trained = load_file(next((tmp_path / "run" / "trajectories").glob("shard-*.safetensors")))["latents"]
    assert not any(torch.equal(state, row) for state in states.latents for row in trained)  # none is a training state
    embeds = encode_prompts(pipe, states.prompts, "cpu", 16).prompt_embeds
    with torch.no_grad():
        guided = output_guided(guide, states.conditional, states.latents, states.timesteps, embeds, states.guidance)
    target = cfg_combine(states.unconditional, states.conditional, states.guidance)
    expected = squared_error(guided, target, states.guidance, per_unit_guidance=True).mean().item()
    assert validation[-1][1] == pytest.approx(expected, rel=1e-4)
    assert validation[0][1] != pytest.approx(expected, rel=1e-3)  # the untrained guide's figure came first


def test_empty_prompt_file_is_a_clear_error(tiny_base_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="has no prompts"):
        train_guide(_config(tiny_base_dir, empty, tmp_path))


def test_init_guide_continues_from_a_trained_guide(tiny_base_dir, prompt_file, tmp_path):
    start = OutputGuide.from_unet(load_pipeline(tiny_base_dir).unet)
    for p in start.parameters():
        torch.nn.init.normal_(p, std=0.05)
    start.save_pretrained(tmp_path / "start")
    guide = train_guide(_config(tiny_base_dir, prompt_file, tmp_path, init_guide=str(tmp_path / "start"), max_steps=1, learning_rate=1e-9))
    for (name, a), b in zip(guide.state_dict().items(), start.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_init_guide_for_another_unet_is_a_clear_error(tiny_base_dir, prompt_file, tmp_path):
    from conftest import tiny_unet

    OutputGuide.from_unet(tiny_unet(block_out_channels=(32, 32))).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="block_out_channels"):
        train_guide(_config(tiny_base_dir, prompt_file, tmp_path, init_guide=str(tmp_path / "other")))


def test_init_guide_distilled_with_another_text_encoder_is_a_clear_error(tiny_base_dir, prompt_file, tmp_path):
    """Same UNet widths, other text encoder (the base-te3 case): training it further here would silently re-learn it."""
    start = OutputGuide.from_unet(load_pipeline(tiny_base_dir).unet)
    start.register_to_config(trained_text_encoder="BertModel:other-weights")
    start.save_pretrained(tmp_path / "start")
    with pytest.raises(ValueError, match="trained for another base"):
        train_guide(_config(tiny_base_dir, prompt_file, tmp_path, init_guide=str(tmp_path / "start")))


def test_an_output_guide_learns_with_the_timestep_loss(tiny_base_dir, prompt_file, tmp_path):
    config = _config(tiny_base_dir, prompt_file, tmp_path, loss_weighting="timestep", learning_rate=1e-3)
    pipe = load_pipeline(tiny_base_dir)
    batch, negative = _held_out_batch(pipe, prompt_file, config, tmp_path)
    trained = train_guide(config)
    assert isinstance(trained, OutputGuide)
    untrained = OutputGuide.from_unet(pipe.unet)
    with torch.no_grad():
        before = distillation_loss(pipe.unet, untrained, batch, negative, "none").item()
        after = distillation_loss(pipe.unet, trained, batch, negative, "none").item()
    assert after < 0.8 * before


def test_timestep_weighting_divides_by_the_mean_gap_of_each_samples_band_of_t(tiny_base_dir):
    """The table holds the mean gap per band (plus the floor); an empty band takes its nearest band's mean; the loss
    of an untrained guide (error = gap) is then each sample's gap over its band's mean."""
    pipe = load_pipeline(tiny_base_dir)
    conditioning = encode_prompts(pipe, ["a red circle on a black background"] * 3, "cpu", 16)
    negative = encode_negative(pipe, "cpu", 16)
    torch.manual_seed(0)
    batch = {"sample": torch.randn(3, 4, 8, 8), "timesteps": torch.tensor([990, 980, 100]), "conditioning": conditioning,
             "guidance_scale": torch.tensor([3.0, 7.0, 5.0])}
    with torch.no_grad():
        cfg, cond = cfg_and_conditional(pipe.unet, batch["sample"], batch["timesteps"], conditioning.prompt_embeds,
                                        negative.expand(3).prompt_embeds, batch["guidance_scale"])
        gap = (cfg - cond).pow(2).flatten(1).mean(1)
        gaps = timestep_gap_table(pipe.unet, [batch], negative, 1000)
        loss = distillation_loss(pipe.unet, ResidualGuide.from_unet(pipe.unet), batch, negative, "timestep", gaps).item()
    table = gaps.means
    last, low = timestep_bucket(torch.tensor([990, 100]), 1000).tolist()
    assert table[last].item() == pytest.approx(gap[:2].mean().item() + GAP_FLOOR, rel=1e-5)
    assert table[low].item() == pytest.approx(gap[2].item() + GAP_FLOOR, rel=1e-5)
    assert table[0].item() == table[low].item() and table[last - 1].item() == table[last].item()  # nearest measured band
    expected = torch.stack([gap[0] / table[last], gap[1] / table[last], gap[2] / table[low]]).mean().item()
    assert loss == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():  # one band per timestep (trajectory states): 990 and 980 apart
        per_timestep = timestep_gap_table(pipe.unet, [batch], negative, 1000, buckets=1000)
    assert per_timestep.at(torch.tensor([990, 980, 100])).tolist() == pytest.approx((gap + GAP_FLOOR).tolist(), rel=1e-5)


def test_distill_with_timestep_weighting_trains_and_records_it(tiny_base_dir, prompt_file, tmp_path):
    config = _config(tiny_base_dir, prompt_file, tmp_path, design="residual", loss_weighting="timestep")
    pipe = load_pipeline(tiny_base_dir)
    batch, negative = _held_out_batch(pipe, prompt_file, config, tmp_path)
    trained = train_guide(config)
    untrained = ResidualGuide.from_unet(pipe.unet)
    with torch.no_grad():
        before = distillation_loss(pipe.unet, untrained, batch, negative, "none").item()
        after = distillation_loss(pipe.unet, trained, batch, negative, "none").item()
    assert after < before
    assert '"loss_weighting": "timestep"' in (tmp_path / "run" / "config.json").read_text().replace("\n", "")


def test_mix_source_is_refused_with_a_prompt_file_and_a_batch_of_one():
    with pytest.raises(ValueError, match="--prompts is read by source 'trajectories' only"):
        GuidanceDistillConfig(source="mix", prompts="p.txt")
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        GuidanceDistillConfig(source="mix", batch_size=1)
    with pytest.raises(ValueError, match="design must be one of"):
        GuidanceDistillConfig(design="pixels")


def test_timestep_weighting_resumes_to_the_uninterrupted_weights(tiny_base_dir, prompt_file, tmp_path, monkeypatch):
    """The gap table is measured from the seed alone, so a run stopped after its checkpoint and resumed divides by
    the same numbers and ends with the uninterrupted run's weights."""
    import pnpguide.distill_guidance as stage1

    settings = dict(loss_weighting="timestep", max_steps=4, checkpointing_steps=2, batch_size=4)
    whole = train_guide(_config(tiny_base_dir, prompt_file, tmp_path / "whole", **settings))
    loss, calls = stage1.distillation_loss, []

    def crash_at_step_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return loss(*args, **kwargs)

    monkeypatch.setattr(stage1, "distillation_loss", crash_at_step_three)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_guide(_config(tiny_base_dir, prompt_file, tmp_path / "parts", **settings))
    monkeypatch.setattr(stage1, "distillation_loss", loss)
    resumed = train_guide(_config(tiny_base_dir, prompt_file, tmp_path / "parts", **settings, resume="latest"))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_a_guide_adapts_to_base_plus_lora_weights_on_the_fine_tunes_own_teacher(tiny_base_dir, prompt_file, tmp_path):
    """`--lora`: the LoRA weights are fused into the base for the teacher and the guide's UNet, so the guide and its
    carry are the fine-tune's; the base folder is left as it was."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from dropin import add_random_lora

    pipe = load_pipeline(tiny_base_dir)
    add_random_lora(pipe.unet)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    before = {k: v.clone() for k, v in load_pipeline(tiny_base_dir).unet.state_dict().items()}
    plain = train_guide(_config(tiny_base_dir, prompt_file, tmp_path / "plain", max_steps=1))
    adapted = train_guide(_config(tiny_base_dir, prompt_file, tmp_path / "adapted", max_steps=1, lora=str(tmp_path / "lora")))
    assert adapted.correction_carry.factors != plain.correction_carry.factors  # fitted on the fine-tune's CFG
    assert all(torch.equal(before[k], v) for k, v in load_pipeline(tiny_base_dir).unet.state_dict().items())
    card = (tmp_path / "adapted" / "run" / "guide" / "README.md").read_text()
    assert f"with the LoRA weights {tmp_path / 'lora'}" in card and f",lora={tmp_path / 'lora'}" in card
    with pytest.raises(FileNotFoundError, match="LoRA folder 'no-such-lora' does not exist"):
        _config(tiny_base_dir, prompt_file, tmp_path, lora="no-such-lora")
