"""An output guide's negative head: a second head that reads the negative prompt, added to a trained guide
and trained alone, so that without a negative the guide is exactly the one it was made from."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open

from conftest import distill_flags, guide_inputs, randomised
from pnpguide.distill_guidance import GuidanceDistillConfig
from pnpguide.evaluation.speed import SD15, count_flops, plain_attention, step_cost
from pnpguide.guide import GuideModel, OutputGuide, ResidualGuide
from pnpguide.negatives import NegativeSampler
from pnpguide.pipeline import PlugAndPlayPipeline
from pnpguide.teacher import guided_noise_pred

PROMPTS = ["a red circle on a black background", "a blue square above a green triangle on a white background"]


def _with_trained_head(unet, seed=4):
    """A randomised output guide with a negative head whose weights are random too (as if trained)."""
    guide = randomised(OutputGuide.from_unet(unet)).with_negative_head()
    torch.manual_seed(seed)
    for p in guide.negative_output_head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return guide


def test_a_new_negative_head_changes_nothing_and_starts_from_the_prompts_head(unet):
    guide = randomised(OutputGuide.from_unet(unet))
    headed = guide.with_negative_head()
    sample, t, embeds = guide_inputs()
    negative = torch.randn(2, 5, 32)
    expected = guided_noise_pred(unet, guide, sample, t, embeds, 5.0)
    assert torch.equal(expected, guided_noise_pred(unet, headed, sample, t, embeds, 5.0, negative_prompt_embeds=negative))
    head, prompt_head = headed.negative_output_head.state_dict(), guide.output_head.state_dict()
    assert all(torch.equal(head[name], value) for name, value in prompt_head.items() if not name.startswith("conv_out"))
    assert not headed.negative_output_head.conv_out.weight.any()
    assert headed.with_negative_head() is headed


def test_the_head_acts_only_on_rows_with_a_negative(unet):
    guide = _with_trained_head(unet)
    plain = randomised(OutputGuide.from_unet(unet))  # the same prompt head, no negative head
    sample, t, embeds = guide_inputs()
    negative = torch.randn(2, 5, 32)
    without = guided_noise_pred(unet, plain, sample, t, embeds, 5.0)
    assert torch.equal(without, guided_noise_pred(unet, guide, sample, t, embeds, 5.0))  # no negative: the guide it was made from
    both = guided_noise_pred(unet, guide, sample, t, embeds, 5.0, negative_prompt_embeds=negative)
    assert (both - without).abs().amin(dim=(1, 2, 3)).gt(0).all()
    rows = torch.tensor([False, True])
    masked = guided_noise_pred(unet, guide, sample, t, embeds, 5.0, negative_prompt_embeds=negative, negative_rows=rows)
    assert torch.equal(masked[0], without[0]) and torch.allclose(masked[1], both[1], atol=1e-6)
    assert torch.equal(without, guided_noise_pred(unet, guide, sample, t, embeds, 5.0, negative_prompt_embeds=negative,
                                                  negative_rows=torch.tensor([False, False])))


def test_the_negatives_correction_has_cfgs_form_in_w(unet):
    guide = _with_trained_head(unet)
    sample, t, embeds = guide_inputs()
    negative = torch.randn(2, 5, 32)
    cond = unet(sample, t, embeds).sample
    at = lambda w: guided_noise_pred(unet, guide, sample, t, embeds, w, negative_prompt_embeds=negative) - cond  # noqa: E731
    torch.testing.assert_close(at(7.0), 3 * at(3.0), rtol=1e-4, atol=1e-6)


def test_a_negative_head_saves_and_loads(unet, tmp_path):
    guide = _with_trained_head(unet)
    guide.save_pretrained(tmp_path / "guide")
    loaded = GuideModel.from_pretrained(tmp_path / "guide")
    assert loaded.config.negative_head and loaded.reads_negative_prompt
    sample, t, embeds = guide_inputs()
    negative = torch.randn(1, 5, 32)
    torch.testing.assert_close(guided_noise_pred(unet, loaded, sample, t, embeds, 4.0, negative_prompt_embeds=negative),
                               guided_noise_pred(unet, guide, sample, t, embeds, 4.0, negative_prompt_embeds=negative))


def test_only_an_output_guide_gets_a_negative_head(unet):
    assert not hasattr(ResidualGuide.from_unet(unet), "with_negative_head")
    assert not ResidualGuide.from_unet(unet).reads_negative_prompt


def test_a_negative_head_keeps_the_output_guide_in_budget_on_sd15():
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**SD15)
        plain = OutputGuide.from_unet(sd15)
        headed = plain.with_negative_head()
    assert sum(p.numel() for p in headed.parameters()) / sum(p.numel() for p in sd15.parameters()) <= 0.01
    plain_cost = step_cost(sd15, plain, tokens=77)
    assert step_cost(sd15, headed, tokens=77).guide == plain_cost.guide  # without a negative prompt the head is skipped
    with torch.device("meta"), plain_attention(sd15, headed):  # a step with a negative prompt: the head runs too
        sample, embeds = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768)
        with_negative = count_flops(lambda: guided_noise_pred(sd15, headed, sample, 500, embeds, 5.0, negative_prompt_embeds=embeds))
    head_cost = with_negative - plain_cost.unet
    assert head_cost > 1.9 * plain_cost.guide  # the head is counted, once more the prompt head's cost
    assert (plain_cost.unet + head_cost) / plain_cost.cfg <= 0.505


# --- the pipeline ------------------------------------------------------------------------------------------------------

def _run(pipe, **kwargs):
    args = dict(prompt=PROMPTS, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0), guidance_scale=6.0)
    return pipe(**(args | kwargs)).images


def test_the_pipeline_applies_the_head_to_the_rows_that_have_a_negative(tiny_components):
    unet = tiny_components["unet"]
    pipe = PlugAndPlayPipeline(**tiny_components, guide=_with_trained_head(unet))
    pipe.set_progress_bar_config(disable=True)
    plain = PlugAndPlayPipeline(**tiny_components, guide=randomised(OutputGuide.from_unet(unet)))
    plain.set_progress_bar_config(disable=True)
    without = _run(plain)
    np.testing.assert_array_equal(without, _run(pipe))  # no negative prompt: exactly the guide without the head
    np.testing.assert_array_equal(without, _run(pipe, negative_prompt=["", ""]))
    mixed = _run(pipe, negative_prompt=["", "blue square"])
    np.testing.assert_array_equal(mixed[0], without[0])
    assert np.abs(mixed[1] - without[1]).max() > 1e-3
    _, embeds = pipe.encode_prompt(PROMPTS, "cpu", 1, True, ["", "blue square"])
    np.testing.assert_array_equal(mixed, _run(pipe, negative_prompt_embeds=embeds))


# --- training -----------------------------------------------------------------------------------------------------------

def test_distill_negative_head_trains_the_head_alone_on_runs_recorded_with_negatives(tiny_base_dir, prompt_file, tmp_path):
    from pnpguide.cli import main

    assert main(distill_flags(tiny_base_dir, prompt_file, tmp_path / "a", max_steps=2)) == 0
    flags = distill_flags(tiny_base_dir, prompt_file, tmp_path / "b", init_guide=tmp_path / "a" / "guide", negative_head=True,
                          negative_rate=1.0, learning_rate=0.01, validation_trajectories=4, trajectory_first_steps=3)
    assert main(flags) == 0
    before, after = GuideModel.from_pretrained(tmp_path / "a" / "guide"), GuideModel.from_pretrained(tmp_path / "b" / "guide")
    assert after.config.negative_head and after.negative_output_head.conv_out.weight.abs().sum() > 0  # the head trained
    assert before.config.trained_first_steps == 4  # an output guide on 4-step runs learns all of them
    assert after.config.negative_first_steps == 3 and after.config.trained_first_steps == 4  # the rest: the steps it had
    assert after.correction_carry == before.correction_carry  # the carry it was saved with
    trained = after.state_dict()
    assert all(torch.equal(value, trained[name]) for name, value in before.state_dict().items())  # nothing else moved
    shards = sorted((tmp_path / "b" / "trajectories").glob("shard-*.safetensors"))
    with safe_open(str(shards[0]), framework="pt") as f:
        negative_ids = f.get_tensor("negative_ids")
        assert "negatives" in f.metadata()
    table = NegativeSampler(rate=1.0).table(prompt_file.read_text().splitlines())
    assert all(table[i] for i in negative_ids.tolist())  # every run had a negative (rate 1)
    logged = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert any("validation_loss" in entry for entry in logged)


def test_runs_recorded_with_a_negative_store_the_negatives_unconditional_pass(tiny_components, prompt_file, tmp_path):
    from accelerate import Accelerator
    from diffusers import StableDiffusionPipeline

    from pnpguide.conditioning import encode_prompts
    from pnpguide.sources import teacher_trajectories

    pipe = StableDiffusionPipeline(**tiny_components)
    config = GuidanceDistillConfig(output_dir=str(tmp_path), prompts=str(prompt_file), trajectories=3, trajectory_steps=3, negative_rate=1.0,
                                   base=None, source="trajectories")
    sampler = NegativeSampler(rate=1.0)
    pool = teacher_trajectories(pipe, PROMPTS, tmp_path / "t", config, Accelerator(cpu=True), "states", 2, sampler)
    rows = pool.rows(torch.arange(len(pool)))
    assert all(rows.negatives) and len(rows.negatives) == 6
    negative = encode_prompts(pipe, rows.negatives[:1], "cpu", 16).prompt_embeds
    expected = pipe.unet(rows.latents[:1], rows.timesteps[:1], encoder_hidden_states=negative).sample
    torch.testing.assert_close(rows.unconditional[:1], expected, rtol=1e-4, atol=1e-5)
    plain = teacher_trajectories(pipe, PROMPTS, tmp_path / "p", config, Accelerator(cpu=True), "states", 2)
    assert plain.rows(torch.arange(2)).negatives is None
    torch.testing.assert_close(plain.rows(torch.arange(1)).latents, rows.latents[:1])  # the same first state: runs draw the negative last


def test_negative_head_needs_a_trained_guide():
    with pytest.raises(ValueError, match="negative_head adds a head for the negative prompt to a trained output guide: give --init-guide"):
        GuidanceDistillConfig(negative_head=True)
    assert GuidanceDistillConfig(negative_head=True, init_guide="default").negatives


def test_negative_head_refuses_a_guide_that_is_not_an_output_guide(tiny_base_dir, prompt_file, tmp_path, capsys):
    from pnpguide.cli import main

    assert main(distill_flags(tiny_base_dir, prompt_file, tmp_path / "a", max_steps=1, design="residual")) == 0
    assert main(distill_flags(tiny_base_dir, prompt_file, tmp_path / "b", init_guide=tmp_path / "a" / "guide", negative_head=True,
                              design="residual")) != 0
    assert "--negative-head adds a head to an output guide" in capsys.readouterr().err


def _first_steps_guide_with_head(unet, folder):
    guide = OutputGuide.from_unet(unet).with_negative_head()
    guide.register_to_config(trained_first_steps=2, negative_first_steps=3)
    guide.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("negative_rate", [1.0, 0.0])
def test_step_distillation_trains_the_negative_head_on_samples_with_a_negative_only(tiny_components, prompt_file, tmp_path, negative_rate):
    """Stage 2 keeps the negative head: the samples with a negative train it, the others skip it, as the
    pipeline does. The student learns every step of its grid, so it no longer asks for a correction carry."""
    from pnpguide.distill_steps import StepDistillConfig, distill_steps

    folder = _first_steps_guide_with_head(tiny_components["unet"], tmp_path / "guide")
    StableDiffusionPipeline(**tiny_components).save_pretrained(tmp_path / "base")
    config = StepDistillConfig(output_dir=str(tmp_path / "steps"), guide=str(folder), base=str(tmp_path / "base"), prompts=str(prompt_file),
                               source="trajectories", trajectories=4, trajectory_steps=2, teacher_steps=4, student_steps=2, max_steps=3,
                               batch_size=4, lr_warmup_steps=0, learning_rate=1e-2, negative_rate=negative_rate)
    student = GuideModel.from_pretrained(distill_steps(config)[2])
    assert student.config.negative_head and len(student.config.trained_timesteps) == 2
    assert student.config.trained_first_steps is None and student.config.negative_first_steps is None
    assert student.negative_output_head.conv_out.weight.any() == (negative_rate > 0)
    assert student.output_head.conv_out.weight.any()


def test_the_stage_2_denoiser_runs_the_negative_head_on_the_rows_marked_only(unet):
    from pnpguide.conditioning import Conditioning
    from pnpguide.distill_steps import Denoiser

    guide, plain = _with_trained_head(unet), randomised(OutputGuide.from_unet(unet))
    sample, t, embeds = guide_inputs()
    denoiser = Denoiser(unet, {"prediction_type": "epsilon"}, Conditioning(torch.zeros(1, 6, 32)))
    negative, one = Conditioning(torch.randn(2, 6, 32)), torch.ones(2, 1, 1, 1)
    x0 = lambda model, **kwargs: denoiser.x0(model, sample, t, Conditioning(embeds), torch.tensor([3.0, 6.0]), one, one, **kwargs)  # noqa: E731
    without = x0(plain)
    assert torch.equal(x0(guide), without) and torch.equal(x0(guide, negative=negative), without)
    marked = x0(guide, negative=negative, negative_rows=torch.tensor([False, True]))
    assert torch.equal(marked[0], without[0]) and not torch.allclose(marked[1], without[1])


def test_the_shipped_negative_head_brings_the_output_towards_cfg_with_the_negative_and_changes_nothing_without_one():
    """Integration: the shipped `default` guide at its first step (t = 999), negatives naming an attribute of the prompt."""
    from pnpguide.conditioning import encode_negative, encode_negatives, encode_prompts
    from pnpguide.loading import load_guide, load_pipeline
    from pnpguide.teacher import cfg_noise_pred

    pipe, guide = load_pipeline(None), load_guide("default")
    plain = _without_negative_head(guide)
    prompts = ["a red circle on a black background", "a blue triangle above a yellow square on a white background"] * 4
    negatives = ["red", "circle", "blue", "yellow square"] * 2
    conditioning = encode_prompts(pipe, prompts, "cpu", 64)
    negative = encode_negatives(pipe, negatives, encode_negative(pipe, "cpu", 64), "cpu", 64)
    sample = torch.randn(len(prompts), 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cfg = cfg_noise_pred(pipe.unet, sample, 999, conditioning.prompt_embeds, negative.prompt_embeds, 7.5)
        without = guided_noise_pred(pipe.unet, plain, sample, 999, conditioning.prompt_embeds, 7.5)
        guided = guided_noise_pred(pipe.unet, guide, sample, 999, conditioning.prompt_embeds, 7.5, negative_prompt_embeds=negative.prompt_embeds)
        assert torch.equal(without, guided_noise_pred(pipe.unet, guide, sample, 999, conditioning.prompt_embeds, 7.5))
    gap_closed = 1 - (guided - cfg).pow(2).mean() / (without - cfg).pow(2).mean()  # of what the guide without the head leaves (0.955 when shipped)
    assert gap_closed > 0.8, f"closed {gap_closed:.3f} of the negative's gap at the first step"


def test_with_a_negative_a_head_trained_on_more_steps_runs_them_before_the_correction_is_carried(tiny_components):
    import warnings

    from pnpguide import CorrectionCarry

    guide = _with_trained_head(tiny_components["unet"])
    guide.register_to_config(trained_first_steps=2, negative_first_steps=3)
    pipe = PlugAndPlayPipeline(**tiny_components, guide=guide)
    pipe.set_progress_bar_config(disable=True)
    carry = CorrectionCarry.fit(pipe, PROMPTS, full_steps=2, num_inference_steps=5)
    guide.correction_carry = carry  # as a guide folder holds it
    calls = []
    handle = guide.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # 3 steps is what this guide was trained for: no "first steps only" warning
            for negative_prompt in (None, ["", ""], ["red", ""]):
                calls.clear()
                _run(pipe, num_inference_steps=5, negative_prompt=negative_prompt)  # the guide's own policy: its carry
                assert len(calls) == (3 if negative_prompt == ["red", ""] else 2), negative_prompt
    finally:
        handle.remove()
    assert carry.full_steps == 2  # the caller's carry is left as it was


def test_the_shipped_step_distilled_output_guides_keep_the_negative_head_and_need_no_carry():
    """Integration: `8-step` (stage 2 from `default`) samples its 8 steps without asking for a carry or
    warning, and a negative prompt changes its images (the head kept through stage 2)."""
    import warnings

    from pnpguide.loading import load_guide, load_pipeline

    guide = load_guide("8-step")
    assert len(guide.config.trained_timesteps) == 8 and guide.config.negative_head and guide.correction_carry is None
    assert guide.config.trained_first_steps is None and guide.config.negative_first_steps is None
    pipe = PlugAndPlayPipeline(**load_pipeline(None).components, guide=guide)
    pipe.set_progress_bar_config(disable=True)
    run = lambda **kwargs: pipe(["a red circle on a black background"] * 2, num_inference_steps=8, guidance_scale=7.5,  # noqa: E731
                                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain, negated = run(), run(negative_prompt=["", "red"])
    # without a negative it guides only at t >= 500 (where its guidance was measured to pay); a call with a negative guides
    # every step, as the interval (0, 1000) does: the late steps keep the negated attribute out
    assert tuple(guide.config.default_guidance_interval) == (500, 1000)
    on_its_grid = dataclasses.replace(guide.policy, negative=None)
    every_step = run(policy=dataclasses.replace(on_its_grid, interval=(0, 1000)))
    np.testing.assert_array_equal(run(policy=dataclasses.replace(on_its_grid, interval=(500, 1000))), plain)
    assert np.abs(every_step - plain).mean() > 1e-3
    assert np.array_equal(every_step[0], negated[0])  # an empty negative: the head is skipped
    assert np.abs(every_step[1] - negated[1]).mean() > 0.01
    policy = _policy_detail("8-step")
    assert "guidance only at t in [500, 1000]" in policy and "with a negative prompt it guides every step" in policy


def _policy_detail(guide: str) -> str:
    from pnpguide.doctor import check_pair

    return next(check.detail for check in check_pair(None, guide) if check.name == "sampling policy")


def _without_negative_head(guide: OutputGuide) -> OutputGuide:
    """The same guide with its negative head left out: what it was before the head was added."""
    config = {key: value for key, value in guide.config.items() if not key.startswith("_")}
    plain = OutputGuide.from_config({**config, "negative_head": False})
    weights = {name: value for name, value in guide.state_dict().items() if not name.startswith("negative_output_head.")}
    plain.load_state_dict(weights)
    return plain.eval()
