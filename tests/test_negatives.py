"""Negative prompts in guide mode: an output guide's negative head, the pipelines, both distillation stages."""

import warnings

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from conftest import distill_flags
from pnpguide.conditioning import encode_negative, encode_negatives, encode_prompts
from pnpguide.distill_guidance import GuidanceDistillConfig
from pnpguide.distill_steps import StepDistillConfig, distill_steps
from pnpguide.guide import GuideModel, OutputGuide, ResidualGuide
from pnpguide.negatives import NegativeSampler, attribute_spans
from pnpguide.pipeline import PlugAndPlayPipeline
from pnpguide.teacher import guided_noise_pred

PROMPTS = ["a red circle on a black background", "a blue square above a green triangle on a white background"]


def _inputs(batch=2, dim=32):
    torch.manual_seed(1)
    return torch.randn(batch, 4, 8, 8), torch.tensor([10, 700])[:batch], torch.randn(batch, 6, dim), torch.randn(batch, 5, dim)


def _randomised(guide, seed=3, std=0.05):
    torch.manual_seed(seed)
    for p in guide.parameters():
        torch.nn.init.normal_(p, std=std)
    return guide


def _headed(unet, std=0.05):
    """An output guide with a negative head, every weight random (as if trained)."""
    return _randomised(OutputGuide.from_unet(unet).with_negative_head(), std=std)


@pytest.mark.parametrize("positive_only", [OutputGuide, ResidualGuide])
def test_the_negative_prompt_changes_the_output_of_a_guide_with_a_negative_head_only(unet, positive_only):
    sample, t, embeds, negative = _inputs()
    reading = _headed(unet)
    a = guided_noise_pred(unet, reading, sample, t, embeds, 5.0, negative_prompt_embeds=negative)
    b = guided_noise_pred(unet, reading, sample, t, embeds, 5.0, negative_prompt_embeds=negative + 1)
    assert (a - b).abs().max() > 1e-4
    positive_only = _randomised(positive_only.from_unet(unet))
    assert reading.reads_negative_prompt and not positive_only.reads_negative_prompt
    c = guided_noise_pred(unet, positive_only, sample, t, embeds, 5.0, negative_prompt_embeds=negative)
    assert torch.equal(c, guided_noise_pred(unet, positive_only, sample, t, embeds, 5.0, negative_prompt_embeds=negative + 1))


def test_one_negative_row_serves_the_whole_batch(unet):
    guide = _headed(unet)
    sample, t, embeds, negative = _inputs()
    one = guided_noise_pred(unet, guide, sample, t, embeds, 5.0, negative_prompt_embeds=negative[:1])
    both = guided_noise_pred(unet, guide, sample, t, embeds, 5.0, negative_prompt_embeds=negative[:1].expand(2, -1, -1))
    torch.testing.assert_close(one, both)


def test_a_guide_saved_before_negative_heads_existed_gets_one(unet, tmp_path):
    guide = _randomised(OutputGuide.from_unet(unet))
    guide.save_pretrained(tmp_path / "old")
    config = tmp_path / "old" / "config.json"
    assert '"negative_head": false,' in config.read_text()
    config.write_text(config.read_text().replace('"negative_head": false,', ""))  # as guides saved before the field
    old = GuideModel.from_pretrained(tmp_path / "old")
    assert "negative_head" in old.config["_use_default_values"] and not old.reads_negative_prompt
    reading = old.with_negative_head()
    assert reading.config.negative_head and not reading.negative_output_head.conv_out.weight.any()
    state = reading.state_dict()
    assert all(torch.equal(value, state[name]) for name, value in old.state_dict().items())  # every trained weight kept


# --- pipelines ---------------------------------------------------------------------------------------------------------

def _pipe(components, guide):
    pipe = PlugAndPlayPipeline(**components, guide=guide)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kwargs):
    args = dict(prompt=PROMPTS, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0), guidance_scale=6.0)
    return pipe(**(args | kwargs)).images


def test_guide_mode_uses_the_negative_prompt_with_a_guide_that_reads_it(tiny_components):
    pipe = _pipe(tiny_components, _headed(tiny_components["unet"], std=0.3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ignored" warning
        plain, negated = _run(pipe), _run(pipe, negative_prompt=["red", "blue square"])
    assert np.abs(plain - negated).max() > 1e-3
    np.testing.assert_array_equal(plain, _run(pipe, negative_prompt=["", ""]))  # no negative = the empty prompt, as CFG


@pytest.mark.parametrize("design", [OutputGuide, ResidualGuide])
def test_guide_mode_with_a_guide_without_a_negative_head_warns_and_ignores_the_negative(tiny_components, design):
    pipe = _pipe(tiny_components, _randomised(design.from_unet(tiny_components["unet"])))
    with pytest.warns(UserWarning, match="negative_prompt is ignored in guide mode"):
        negated = _run(pipe, negative_prompt=["red", "blue square"])
    np.testing.assert_array_equal(negated, _run(pipe))


def test_negative_prompt_embeds_work_like_the_negative_prompt(tiny_components):
    pipe = _pipe(tiny_components, _headed(tiny_components["unet"], std=0.3))
    _, negative_embeds = pipe.encode_prompt(PROMPTS, "cpu", 1, True, ["red", "green"])
    np.testing.assert_array_equal(_run(pipe, negative_prompt=["red", "green"]), _run(pipe, negative_prompt_embeds=negative_embeds))


# --- what training draws ----------------------------------------------------------------------------------------------

def test_attribute_spans_are_content_words_and_their_neighbouring_pairs():
    assert attribute_spans("a red circle above a blue square on a gray background") == [
        "red", "circle", "blue", "square", "gray", "background", "red circle", "blue square", "gray background"]


def test_the_sampler_draws_the_empty_prompt_at_the_rest_of_the_rate():
    prompts = PROMPTS * 200
    assert NegativeSampler(rate=0.0).draw(prompts, torch.Generator().manual_seed(0)) == [""] * 400
    drawn = NegativeSampler(rate=0.5).draw(prompts, torch.Generator().manual_seed(0))
    assert 0.4 < sum(n == "" for n in drawn) / len(drawn) < 0.6


def test_the_sampler_draws_other_captions_attributes_and_file_lines_seeded():
    sampler = NegativeSampler(rate=1.0, file_prompts=("blurry", "lowres"))
    drawn = sampler.draw(PROMPTS * 50, torch.Generator().manual_seed(0))
    assert drawn == sampler.draw(PROMPTS * 50, torch.Generator().manual_seed(0))
    prompt_of = {i: PROMPTS[i % 2] for i in range(100)}
    captions = [i for i, n in enumerate(drawn) if n in PROMPTS]
    attributes = [i for i, n in enumerate(drawn) if n in attribute_spans(prompt_of[i])]
    files = [i for i, n in enumerate(drawn) if n in ("blurry", "lowres")]
    assert len(captions) + len(attributes) + len(files) == 100 and min(len(captions), len(attributes), len(files)) > 15
    assert all(drawn[i] != prompt_of[i] for i in captions)  # another caption, never the prompt itself


def test_encoded_negatives_take_the_pipelines_empty_prompt_row_for_empty_ones(tiny_components):
    pipe = StableDiffusionPipeline(**tiny_components)
    default = encode_negative(pipe, "cpu", 16)
    encoded = encode_negatives(pipe, ["", "red circle", ""], default, "cpu", 16)
    assert torch.equal(encoded.prompt_embeds[0], default.prompt_embeds[0]) and torch.equal(encoded.prompt_embeds[2], default.prompt_embeds[0])
    assert torch.equal(encoded.prompt_embeds[1], encode_prompts(pipe, ["red circle"], "cpu", 16).prompt_embeds[0])


# --- both stages --------------------------------------------------------------------------------------------------------

def test_distill_with_negatives_saves_a_guide_that_reads_them(tiny_base_dir, prompt_file, tmp_path):
    from pnpguide.cli import main

    negatives = tmp_path / "negatives.txt"
    negatives.write_text("red\ngreen triangle\n")
    assert main(distill_flags(tiny_base_dir, prompt_file, tmp_path / "a", max_steps=2)) == 0
    assert main(distill_flags(tiny_base_dir, prompt_file, tmp_path / "run", init_guide=tmp_path / "a" / "guide", negative_head=True,
                              negative_prompts=negatives)) == 0
    guide = GuideModel.from_pretrained(tmp_path / "run" / "guide")
    assert guide.reads_negative_prompt and guide.negative_output_head.conv_out.weight.abs().sum() > 0  # trained: the head moved


@pytest.mark.parametrize("overrides, match", [
    (dict(negative_rate=1.5), "negative_rate must be in \\[0, 1\\]"),
    (dict(negative_prompts="/nonexistent/negatives.txt"), "prompt file '/nonexistent/negatives.txt' does not exist"),
])
def test_bad_negative_settings_are_one_line_errors(overrides, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        GuidanceDistillConfig(**overrides)


def test_a_negatives_file_is_drawn_for_a_negative_head(tmp_path):
    path = tmp_path / "n.txt"
    path.write_text("blurry\n")
    with pytest.raises(ValueError, match="--negative-prompts are drawn for a negative head: pass --negative-head"):
        GuidanceDistillConfig(negative_prompts=str(path))
    assert GuidanceDistillConfig(negative_prompts=str(path), negative_head=True, init_guide="default").negatives


def test_a_positive_only_guide_learns_negatives_from_where_it_stands(tiny_base_dir, prompt_file, tmp_path):
    from pnpguide.cli import main

    assert main(distill_flags(tiny_base_dir, prompt_file, tmp_path / "a", max_steps=2)) == 0
    assert main(distill_flags(tiny_base_dir, prompt_file, tmp_path / "b", max_steps=2, init_guide=tmp_path / "a" / "guide",
                              negative_head=True)) == 0
    headed = GuideModel.from_pretrained(tmp_path / "b" / "guide")
    assert headed.reads_negative_prompt
    # training it further on the empty prompt alone leaves its negative head as it was: without a negative the head is skipped
    assert main(distill_flags(tiny_base_dir, prompt_file, tmp_path / "c", max_steps=2, init_guide=tmp_path / "b" / "guide")) == 0
    further = GuideModel.from_pretrained(tmp_path / "c" / "guide")
    assert further.reads_negative_prompt and not torch.equal(further.output_head.conv_out.weight, headed.output_head.conv_out.weight)
    assert all(torch.equal(a, b) for a, b in zip(further.negative_output_head.state_dict().values(), headed.negative_output_head.state_dict().values()))


def test_step_distillation_keeps_the_negatives(tiny_components, prompt_file, tmp_path):
    pipe = StableDiffusionPipeline(**tiny_components)
    pipe.save_pretrained(tmp_path / "base")
    OutputGuide.from_unet(pipe.unet).with_negative_head().save_pretrained(tmp_path / "guide")
    config = StepDistillConfig(
        output_dir=str(tmp_path / "steps"), base=str(tmp_path / "base"), guide=str(tmp_path / "guide"), teacher_steps=4, student_steps=2,
        max_steps=2, batch_size=4, prompts=str(prompt_file), trajectories=4, trajectory_steps=2, lr_warmup_steps=0, negative_rate=1.0,
    )
    saved = distill_steps(config)
    assert GuideModel.from_pretrained(saved[2]).reads_negative_prompt


def test_step_distillation_refuses_a_negatives_file_for_a_positive_only_guide(tiny_components, prompt_file, tmp_path):
    OutputGuide.from_unet(tiny_components["unet"]).save_pretrained(tmp_path / "guide")
    negatives = tmp_path / "n.txt"
    negatives.write_text("blurry\n")
    config = StepDistillConfig(output_dir=str(tmp_path / "steps"), guide=str(tmp_path / "guide"), prompts=str(prompt_file),
                               base=None, negative_prompts=str(negatives), source="trajectories", teacher_steps=4, student_steps=2)
    with pytest.raises(ValueError, match="this stage-1 guide does not read negative prompts"):
        distill_steps(config)

