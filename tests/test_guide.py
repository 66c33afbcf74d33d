"""The two guide designs, their budgets on SD1.5, and loading a guide folder (its design, policy and carry)."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import guide_inputs, randomised, tiny_unet
from pnpguide import CorrectionCarry, GuidancePolicy, GuideModel, OutputGuide, ResidualGuide
from pnpguide.evaluation.speed import SD15, parameter_count, step_cost
from pnpguide.guides.residual import residual_channels
from pnpguide.teacher import guided_noise_pred

DESIGNS = [OutputGuide, ResidualGuide]


@pytest.mark.parametrize("design", DESIGNS)
def test_an_untrained_guide_leaves_the_unet_output_unchanged(unet, design):
    guide = design.from_unet(unet)
    sample, t, embeds = guide_inputs()
    plain = unet(sample, t, embeds).sample
    assert torch.equal(plain, guided_noise_pred(unet, guide, sample, t, embeds, torch.tensor([3.0, 8.0])))


def test_residuals_match_the_unet_skip_connections(unet):
    guide = ResidualGuide.from_unet(unet)
    sample, t, embeds = guide_inputs()
    out = guide(sample, t, embeds, 5.0)
    assert [r.shape[1] for r in out.down_block_additional_residuals] == residual_channels(unet.config.block_out_channels, unet.config.layers_per_block)
    assert out.mid_block_additional_residual.shape == (2, 32, 4, 4)


def test_guidance_scale_changes_the_residual_guide(unet):
    guide = randomised(ResidualGuide.from_unet(unet))
    sample, t, embeds = guide_inputs()
    assert not torch.allclose(guide(sample, t, embeds, 2.0).mid_block_additional_residual, guide(sample, t, embeds, 9.0).mid_block_additional_residual)


def test_an_output_guides_correction_is_w_minus_one_times_one_prediction(unet):
    """CFG's form in w: the prediction of cond - uncond does not depend on w, only its weight (w - 1) does."""
    guide = randomised(OutputGuide.from_unet(unet))
    sample, t, embeds = guide_inputs()
    cond = unet(sample, t, embeds).sample
    at_3 = guide(sample, t, embeds, 3.0, unet_output=cond).sample
    at_9 = guide(sample, t, embeds, 9.0, unet_output=cond).sample
    assert at_3.abs().sum() > 0
    torch.testing.assert_close(at_9, 4 * at_3)


@pytest.mark.parametrize("design", DESIGNS)
def test_each_design_is_at_most_one_percent_of_sd15_and_costs_at_most_half_a_percent_over_half_of_cfg(design):
    with torch.device("meta"):  # SD1.5's published config; shapes are all a parameter count needs
        sd15 = UNet2DConditionModel(**SD15)
        guide = design.from_unet(sd15)
        cost = step_cost(sd15, guide, tokens=77)
    assert parameter_count(guide) <= 0.01 * parameter_count(sd15)
    assert cost.unet > 800e9  # SD1.5: ~803 GFLOPs per 64x64 latent with attention counted
    assert cost.ratio <= 0.505


@pytest.mark.parametrize("design", DESIGNS)
def test_plugging_into_another_architecture_is_a_clear_error(unet, design):
    with pytest.raises(ValueError, match="guide built for cross_attention_dim=32, this UNet has 48"):
        design.from_unet(unet).check_compatible(tiny_unet(cross_attention_dim=48))


@pytest.mark.parametrize("design", DESIGNS)
def test_a_saved_guide_loads_as_its_design_with_the_same_outputs(unet, tmp_path, design):
    guide = randomised(design.from_unet(unet))
    guide.save_pretrained(tmp_path / "guide")
    loaded = GuideModel.from_pretrained(tmp_path / "guide")
    assert type(loaded) is design
    sample, t, embeds = guide_inputs()
    assert torch.equal(guided_noise_pred(unet, guide, sample, t, embeds, 4.0), guided_noise_pred(unet, loaded, sample, t, embeds, 4.0))


def test_a_folder_holds_its_carry_and_policy(unet, tmp_path):
    guide = OutputGuide.from_unet(unet)
    guide.register_to_config(trained_first_steps=5, default_guidance_interval=(500, 1000))
    guide.correction_carry = CorrectionCarry(5, [999.0, 500.0, 1.0], [1.0, 0.9, 0.8])
    guide.save_pretrained(tmp_path / "guide")
    assert (tmp_path / "guide" / "correction_carry.json").is_file()
    loaded = GuideModel.from_pretrained(tmp_path / "guide")
    assert loaded.correction_carry == guide.correction_carry
    assert loaded.policy == GuidancePolicy(carry=guide.correction_carry, interval=(500.0, 1000.0), negative=GuidancePolicy(carry=guide.correction_carry))


def test_a_folder_saved_by_the_older_single_guide_class_loads_as_its_design(unet, tmp_path):
    """Older pnpguide saved every design as `GuideModel` with a `reads` field and per-block widths; such folders (and the
    step grid they recorded as a count) still load, with nothing warned."""
    guide = randomised(OutputGuide.from_unet(unet))
    guide.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    width = config.pop("width")
    config.pop("trained_timesteps")
    config.update(_class_name="GuideModel", reads="unet_output", size="tiny", block_out_channels=[width] * 2, reads_negative=False,
                  scale_by_guidance=False, num_attention_heads=[4, 4], trained_step_counts=[4],
                  trained_schedule={"num_train_timesteps": 1000, "timestep_spacing": "trailing"})
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = GuideModel.from_pretrained(tmp_path / "old")
    assert type(loaded) is OutputGuide and loaded.config.width == width
    assert loaded.policy.timesteps == (999, 749, 499, 249)
    assert torch.equal(loaded.output_head.conv_out.weight, guide.output_head.conv_out.weight)


def test_a_design_pnpguide_no_longer_has_is_refused_in_one_line(unet, tmp_path):
    OutputGuide.from_unet(unet).save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text()) | {"_class_name": "GuideModel", "reads": "unet_features"}
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="reads 'unet_features', a design pnpguide no longer has"):
        GuideModel.from_pretrained(tmp_path / "old")


def test_an_unknown_name_lists_the_shipped_guides():
    with pytest.raises(FileNotFoundError, match="shipped guides: 4-step, 8-step, default, paper"):
        GuideModel.from_pretrained("tiny")


@pytest.mark.parametrize("bad", [dict(block_out_channels=(16,)), dict(block_out_channels=(12, 16, 16))])
def test_bad_residual_config_raises_value_error(bad):
    with pytest.raises(ValueError):
        ResidualGuide(**bad)


def test_an_output_guide_width_must_split_into_groups_and_heads():
    with pytest.raises(ValueError, match="width 20 must be divisible"):
        OutputGuide(width=20)
