import json

import pytest
import torch

from conftest import tiny_unet
from pnpguide import doctor
from pnpguide.doctor import Check, check_pair, format_checks
from pnpguide.guide import OutputGuide, ResidualGuide
from pnpguide.guides import text_encoder_signature

ALL_CHECKS = [
    "base folder", "guide files", "base loads offline", "prediction type", "trained guidance range", "guide fits the UNet",
    "guide fits the text encoder", "residuals", "text encoders", "conditioning kind", "sampling policy",
]


def _save_guide(unet, path, trained_guidance_range=(2.0, 9.0), trained_text_encoder=None, design=OutputGuide):
    guide = design.from_unet(unet)
    guide.register_to_config(trained_guidance_range=trained_guidance_range, trained_text_encoder=trained_text_encoder)
    guide.save_pretrained(path)
    return path


@pytest.fixture(params=[OutputGuide, ResidualGuide], ids=["output", "residual"])
def guide_dir(tiny_components, tmp_path, request):
    signature = text_encoder_signature(tiny_components["text_encoder"])
    return _save_guide(tiny_components["unet"], tmp_path / "guide", trained_text_encoder=signature, design=request.param)


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def test_a_matching_pair_passes_every_check(tiny_base_dir, guide_dir):
    checks = check_pair(tiny_base_dir, guide_dir)
    assert sorted(c.name for c in checks) == sorted(ALL_CHECKS)
    assert all(c.ok for c in checks), format_checks(checks)
    assert _by_name(checks)["trained guidance range"].detail == "w in [2.0, 9.0]; negative prompts ignored (distilled against the empty prompt)"
    assert _by_name(checks)["prediction type"].detail == "v_prediction"
    assert _by_name(checks)["sampling policy"].detail == "the full correction at every step of the scheduler's grid"


def test_the_sampling_policy_line_says_how_the_guide_samples_by_default(tiny_base_dir, tiny_components, tmp_path):
    from pnpguide import CorrectionCarry

    guide = OutputGuide.from_unet(tiny_components["unet"]).with_negative_head()
    guide.register_to_config(trained_guidance_range=(2.0, 9.0), trained_first_steps=2, negative_first_steps=3)
    guide.correction_carry = CorrectionCarry(2, [999.0, 749.0, 499.0, 249.0], [1.0, 0.9, 0.8, 0.7])
    guide.save_pretrained(tmp_path / "first-steps")
    check = _by_name(check_pair(tiny_base_dir, tmp_path / "first-steps"))["sampling policy"]
    assert check.ok
    assert check.detail == ("4 steps by default; the first 2 run the full correction, then it is carried on (other step counts read the "
                            "carry at their own timesteps); with a negative prompt it runs the first 3 steps in full")


def test_a_guide_for_another_unet_fails_naming_the_mismatch(tiny_base_dir, tmp_path):
    foreign = _save_guide(tiny_unet(cross_attention_dim=48), tmp_path / "foreign")
    checks = _by_name(check_pair(tiny_base_dir, foreign))
    assert not checks["guide fits the UNet"].ok
    assert "guide built for cross_attention_dim=48, this UNet has 32" in checks["guide fits the UNet"].detail
    assert checks["base loads offline"].ok and checks["guide files"].ok  # the other checks still run
    report = format_checks(list(checks.values())).splitlines()
    assert "FAIL guide fits the UNet: guide built for cross_attention_dim=48, this UNet has 32; retrain or pick the matching guide" in report


def test_residual_widths_that_do_not_match_the_unet_fail(unet):
    """A second line of defence behind check_compatible: the projections the guide really has, against the UNet."""
    guide = ResidualGuide.from_unet(unet)
    assert doctor._residuals(guide, unet).ok
    guide.down_projections[-1] = torch.nn.Conv2d(guide.down_projections[-1].in_channels, 48, 1)
    check = doctor._residuals(guide, unet)
    assert not check.ok and "the guide emits [16, 16, 16, 48] + mid 32, the UNet takes [16, 16, 16, 32] + mid 32" in check.detail


def test_pickle_weights_fail_and_are_never_unpickled(tiny_base_dir, guide_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tiny_base_dir / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # diffusers would fall back to the .bin
    torch.save({"x": Payload()}, tiny_base_dir / "unet" / "diffusion_pytorch_model.bin")
    torch.save({"x": Payload()}, guide_dir / "diffusion_pytorch_model.bin")
    checks = _by_name(check_pair(tiny_base_dir, guide_dir))
    assert not checks["base folder"].ok and "unet/diffusion_pytorch_model.bin" in checks["base folder"].detail
    assert not checks["guide files"].ok and "never unpickles" in checks["guide files"].detail
    assert set(checks) == {"base folder", "guide files"}  # nothing was loaded from either folder
    assert not marker.exists()


def test_missing_or_broken_folders_are_reported_not_raised(tmp_path, tiny_base_dir):
    checks = _by_name(check_pair(tmp_path / "no-base", tmp_path / "no-guide"))
    assert "does not exist" in checks["base folder"].detail and "does not exist" in checks["guide files"].detail
    (tiny_base_dir / "model_index.json").write_text("{oops")
    detail = _by_name(check_pair(tiny_base_dir, tmp_path / "no-guide"))["base folder"].detail
    assert detail.startswith(f"{tiny_base_dir / 'model_index.json'} is not a valid JSON file")


def test_an_unsupported_prediction_type_fails(tiny_base_dir, guide_dir):
    config_file = tiny_base_dir / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"prediction_type": "sample"}))
    check = _by_name(check_pair(tiny_base_dir, guide_dir))["prediction type"]
    assert not check.ok and "'sample' is not supported" in check.detail


def test_an_untrained_guide_has_no_guidance_range(tiny_base_dir, tiny_components, tmp_path):
    untrained = _save_guide(tiny_components["unet"], tmp_path / "untrained", trained_guidance_range=None)
    check = _by_name(check_pair(tiny_base_dir, untrained))["trained guidance range"]
    assert not check.ok and "not recorded" in check.detail


def test_defaults_are_the_embedded_base_and_the_shipped_default_guide(monkeypatch, tiny_base_dir, guide_dir):
    from pnpguide.loading import default_guide_dir

    assert default_guide_dir().name == "default"
    monkeypatch.setattr(doctor, "default_base_dir", lambda: tiny_base_dir)
    monkeypatch.setattr(doctor, "default_guide_dir", lambda name="default": guide_dir if name == "default" else None)
    assert all(c.ok for c in check_pair())


def test_the_report_has_one_line_per_check():
    checks = [Check("a", True, "fine"), Check("b", False, "broken\nacross lines")]
    assert format_checks(checks) == "OK   a: fine\nFAIL b: broken across lines"


def test_a_guide_trained_with_another_text_encoder_fails_naming_both(tiny_base_dir, tiny_components, tmp_path):
    guide = OutputGuide.from_unet(tiny_components["unet"])
    guide.register_to_config(trained_guidance_range=(2.0, 9.0), trained_text_encoder="BertModel (6 layers, 32 wide, vocab 60)")
    guide.save_pretrained(tmp_path / "old-base-guide")
    check = _by_name(check_pair(tiny_base_dir, tmp_path / "old-base-guide"))["guide fits the text encoder"]
    assert not check.ok
    assert "trained for another base, with text encoder BertModel (6 layers, 32 wide, vocab 60); this base has BertModel (2 layers" in check.detail


def test_a_trained_guide_that_does_not_record_its_text_encoder_fails_naming_this_one(tiny_base_dir, tiny_components, tmp_path):
    """Like the embedded guides shipped before the 3-layer base: they would plug in silently and give wrong images."""
    unrecorded = _save_guide(tiny_components["unet"], tmp_path / "unrecorded")
    check = _by_name(check_pair(tiny_base_dir, unrecorded))["guide fits the text encoder"]
    assert not check.ok
    assert "does not record the text encoder it was trained with" in check.detail
    assert text_encoder_signature(tiny_components["text_encoder"]) in check.detail and "\n" not in check.detail


def test_an_output_guide_passes_the_residual_check_and_one_for_another_output_width_fails(unet):
    guide = OutputGuide.from_unet(unet)
    check = doctor._residuals(guide, unet)
    assert check.ok and "corrects the UNet's 4-channel output" in check.detail
    guide.output_head.conv_out = torch.nn.Conv2d(guide.output_head.conv_out.in_channels, 3, 3, padding=1)
    check = doctor._residuals(guide, unet)
    assert not check.ok and "the guide corrects a 3-channel output, the UNet's has 4" in check.detail


def test_lora_distance_is_zero_for_weights_that_change_nothing_and_grows_with_what_they_change(tiny_components):
    """The reach check's measure: MSE(CFG with the LoRA, CFG without) / MSE(no guidance, CFG without), same seeds; it is
    kept on the pipeline for the LoRA warning, with the adapters it was measured for."""
    from peft import LoraConfig

    from dropin import add_random_lora
    from pnpguide.pipeline import PlugAndPlayPipeline

    pipe = PlugAndPlayPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"]))  # B starts at zero: the UNet is unchanged
    prompts = ["a red circle on a black background", "a blue square on a white background"]
    assert pipe.measure_lora_distance(prompts, num_inference_steps=3) == 0.0
    assert pipe.lora_reach.adapters == ("default",) and pipe.lora_reach.scale == 1.0
    pipe.unet.unload_lora()
    add_random_lora(pipe.unet)
    assert pipe.measure_lora_distance(prompts, num_inference_steps=3) > 0.01
