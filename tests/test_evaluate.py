"""`pnpguide eval` on tiny random models: what is counted, compared and written, and how bad input fails."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pnpguide.embedded import shapes
from pnpguide.cli import main
from pnpguide.embedded import features
from pnpguide.evaluation import fid
from pnpguide.evaluation.evaluate import EvalConfig, parse_model_spec, run_eval
from pnpguide.embedded.features import ShapesFeatureNet
from pnpguide import CorrectionCarry, GuideModel, OutputGuide, ResidualGuide


@pytest.fixture
def eval_setup(tiny_base_dir, tiny_components, tmp_path, monkeypatch):
    """A tiny base, an untrained and a 'trained' (random) guide, a 16x16 feature network and a reference folder."""
    torch.manual_seed(0)
    ShapesFeatureNet(channels=(8, 16), num_features=8, image_size=16).save_pretrained(tmp_path / "features")
    monkeypatch.setattr(features, "default_features_dir", lambda: tmp_path / "features")
    untrained = ResidualGuide.from_unet(tiny_components["unet"])
    untrained.save_pretrained(tmp_path / "untrained")
    trained = ResidualGuide.from_unet(tiny_components["unet"])
    for p in trained.parameters():
        torch.nn.init.normal_(p, std=0.05)
    trained.save_pretrained(tmp_path / "trained")
    distilled = ResidualGuide.from_unet(tiny_components["unet"])
    distilled.register_to_config(trained_timesteps=(999, 499), trained_schedule={k: v for k, v in tiny_components["scheduler"].config.items() if not k.startswith("_")})
    distilled.save_pretrained(tmp_path / "two-step")
    reference = tmp_path / "reference"
    reference.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(reference / f"{i}.png")
    return tmp_path


def _config(setup, **overrides):
    settings = dict(
        base=[str(setup / "base")], guide=[str(setup / "untrained"), str(setup / "trained"), str(setup / "two-step")],
        steps=[3], scales=[2.0, 4.0], images=6, batch_size=4, reference=str(setup / "reference"), speed=False,
        grid_prompts=2, out_dir=str(setup / "out"),
    )
    return EvalConfig(**(settings | overrides))


def _row(result, method, steps=3, w=4.0):
    return next(r for r in result["rows"] if r["method"] == method and r["steps"] == steps and r["guidance_scale"] == w)


def test_eval_counts_unet_and_guide_evaluations(eval_setup):
    result = run_eval(_config(eval_setup))
    assert _row(result, "cfg")["unet_evals_per_image"] == 6  # 3 steps x (cond + uncond)
    assert _row(result, "none", w=1.0)["unet_evals_per_image"] == 3
    guided = _row(result, "guide:trained")
    assert (guided["unet_evals_per_image"], guided["guide_evals_per_image"]) == (3, 3)  # teacher calls for the comparison are not counted
    assert _row(result, "cfg")["gflops_per_image"] == pytest.approx(2 * _row(result, "none", w=1.0)["gflops_per_image"])
    assert guided["gflops_per_image"] > _row(result, "none", w=1.0)["gflops_per_image"]


def test_untrained_guide_is_exactly_as_far_from_cfg_as_no_guidance(eval_setup):
    """A zero-initialised guide changes nothing, so its distance from the teacher must equal w = 1's."""
    result = run_eval(_config(eval_setup, scales=[4.0]))
    untrained, none = _row(result, "guide:untrained"), _row(result, "none", w=1.0)
    assert untrained["output_mse_vs_cfg"] == pytest.approx(none["output_mse_vs_cfg"])
    assert untrained["psnr_vs_cfg_db"] == pytest.approx(none["psnr_vs_cfg_db"])
    assert untrained["output_mse_vs_cfg"] > 0
    assert _row(result, "guide:trained")["output_mse_vs_cfg"] != pytest.approx(none["output_mse_vs_cfg"])


def test_gap_closed_is_one_for_cfg_and_zero_for_no_guidance_and_an_untrained_guide(eval_setup):
    """Relative to no guidance: the teacher replayed at its own states closes the whole per-step gap, and a
    zero-initialised guide (the UNet unchanged) closes none of either gap; a guide that acts moves both."""
    result = run_eval(_config(eval_setup, scales=[4.0], guide=[str(eval_setup / "untrained"), str(eval_setup / "trained")]))
    cfg, none, untrained, trained = (_row(result, m, w=w) for m, w in [("cfg", 4.0), ("none", 1.0), ("guide:untrained", 4.0), ("guide:trained", 4.0)])
    assert cfg["step_gap_closed"] == pytest.approx(1.0) and cfg["image_gap_closed"] is None
    for row in (none, untrained):
        assert row["image_gap_closed"] == pytest.approx(0.0, abs=1e-9)
        assert row["step_gap_closed"] == pytest.approx(0.0, abs=1e-6)
    assert trained["image_gap_closed"] != pytest.approx(0.0) and trained["step_gap_closed"] != pytest.approx(0.0)
    per_step = trained["step_gap_closed_per_timestep"]
    assert [s["timestep"] for s in per_step] == [s["timestep"] for s in cfg["step_gap_closed_per_timestep"]] and len(per_step) == 3
    assert all(s["gap_closed"] == pytest.approx(1.0) for s in cfg["step_gap_closed_per_timestep"])
    assert trained["step_gap_images"] == 6  # fewer prompts than FIDELITY_SUBSET: all of them
    assert "| image gap closed | step gap closed |" in (eval_setup / "out" / "report.md").read_text()


def test_a_guide_with_a_default_interval_is_sampled_and_replayed_with_it_against_cfg_at_every_step(eval_setup):
    guide = GuideModel.from_pretrained(str(eval_setup / "trained"))
    guide.register_to_config(default_guidance_interval=(500, 1000))
    guide.save_pretrained(eval_setup / "interval")
    result = run_eval(_config(eval_setup, scales=[4.0], guide=[str(eval_setup / "trained"), str(eval_setup / "interval")]))
    cfg, every_step, inside = _row(result, "cfg"), _row(result, "guide:trained"), _row(result, "guide:interval")
    timesteps = [s["timestep"] for s in cfg["step_gap_closed_per_timestep"]]
    assert inside["guide_evals_per_image"] == sum(500 <= t <= 1000 for t in timesteps) < every_step["guide_evals_per_image"]
    assert cfg["unet_evals_per_image"] == 2 * len(timesteps)  # the teacher keeps w at every step
    for mine, theirs in zip(inside["step_gap_closed_per_timestep"], every_step["step_gap_closed_per_timestep"]):
        if mine["timestep"] >= 500:
            assert mine["gap_closed"] == pytest.approx(theirs["gap_closed"])
        else:  # replayed as sampled: the conditional model, which closes none of CFG's gap
            assert mine["gap_closed"] == pytest.approx(0.0, abs=1e-6) and theirs["gap_closed"] != pytest.approx(0.0)
    assert "guide:interval guides only at t in [500, 1000]" in (eval_setup / "out" / "report.md").read_text()


def test_correction_carry_rows_run_cfg_for_their_full_steps_then_one_pass(eval_setup):
    result = run_eval(_config(eval_setup, scales=[4.0], guide=[str(eval_setup / "trained")], correction_carry=[1, 3]))
    carried, full, cfg = _row(result, "cfg + carry 1"), _row(result, "cfg + carry 3"), _row(result, "cfg")
    assert (carried["unet_evals_per_image"], carried["guide_evals_per_image"]) == (2 + 2, 0)  # 1 CFG step, then 2 carried
    assert full["image_gap_closed"] == pytest.approx(1.0)  # every step in full: CFG
    assert carried["image_gap_closed"] != pytest.approx(1.0) and carried["step_gap_closed"] is None  # no replay at the teacher's states
    assert cfg["image_gap_closed"] is None  # the teacher's own row is not overwritten by the carried ones
    with pytest.raises(ValueError, match=r"correction_carry must be between 1 and the fewest --steps \(3\), got \[4\]"):
        EvalConfig(steps=[3, 8], correction_carry=[4])


def test_adaptive_guidance_rows_run_cfg_per_image_until_its_outputs_agree(eval_setup):
    result = run_eval(_config(eval_setup, scales=[4.0], guide=[], methods=["none", "cfg"], adaptive_thresholds=[1.0, -0.99], correction_carry=[1]))
    never, at_once, carried = _row(result, "cfg + AG 1"), _row(result, "cfg + AG -0.99"), _row(result, "cfg + AG -0.99 + carry")
    assert never["unet_evals_per_image"] == 6 and never["image_gap_closed"] == pytest.approx(1.0)  # cos never reaches 1: CFG
    assert at_once["unet_evals_per_image"] == carried["unet_evals_per_image"] == 2 + 1 + 1  # CFG at the first step only
    assert at_once["image_gap_closed"] != pytest.approx(carried["image_gap_closed"]) and at_once["step_gap_closed"] is None
    with pytest.raises(ValueError, match="adaptive_thresholds are cosines"):
        EvalConfig(adaptive_thresholds=[1.5])


def test_a_guide_distilled_on_the_first_steps_is_evaluated_with_its_own_carry(eval_setup, tiny_components):
    first = OutputGuide.from_unet(tiny_components["unet"])
    first.register_to_config(trained_first_steps=2)
    first.correction_carry = CorrectionCarry(2, [999.0, 666.0, 333.0], [1.0, 0.9, 0.8])
    first.save_pretrained(eval_setup / "first")
    result = run_eval(_config(eval_setup, scales=[4.0], guide=[str(eval_setup / "first")]))
    assert [r["method"] for r in result["rows"] if r["method"].startswith("guide:")] == ["guide:first"]
    row = _row(result, "guide:first")
    assert (row["unet_evals_per_image"], row["guide_evals_per_image"]) == (3, 2) and row["step_gap_closed"] is None


def test_step_distilled_guide_runs_only_at_its_step_counts(eval_setup):
    result = run_eval(_config(eval_setup, steps=[3, 4], cfg_steps=[5]))
    assert {r["steps"] for r in result["rows"] if r["method"] == "guide:two-step"} == {2}
    assert {r["steps"] for r in result["rows"] if r["method"] == "cfg"} == {3, 4, 5}  # cfg_steps: the teacher only
    assert {r["steps"] for r in result["rows"] if r["method"] == "none"} == {3, 4}


def test_eval_writes_report_plots_grids_and_fid_per_seed(eval_setup):
    result = run_eval(_config(eval_setup, seeds=[0, 1], speed=True, methods=["none", "cfg"]))
    out = eval_setup / "out"
    for name in ("report.json", "report.md", "fid-vs-steps.png", "adherence-vs-w.png", "quality-vs-time.png", "grid-base.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "report.json").read_text())
    assert len(saved["rows"]) == len(result["rows"]) == 3  # none once, cfg at two w
    cfg = _row(saved, "cfg")
    assert len(cfg["fid_per_seed"]) == 2 and cfg["fid"] == pytest.approx(np.mean(cfg["fid_per_seed"]))
    assert cfg["seconds_per_image_b8"] > 0 and cfg["seconds_per_image_b1"] > 0
    assert "± " in (out / "report.md").read_text()


def test_eval_cli_json_summary(eval_setup, capsys):
    code = main(["eval", "--base", str(eval_setup / "base"), "--methods", "none", "cfg", "--steps", "2", "--scales", "3",
                 "--images", "4", "--no-speed", "--reference", str(eval_setup / "reference"), "--out-dir", str(eval_setup / "o"), "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["cfg", "none"]
    assert (eval_setup / "o" / "command.txt").read_text().startswith("pnpguide eval --base ")


def test_fid_is_zero_for_the_reference_itself_and_grows_with_degradation(eval_setup):
    scorer = fid.make_fid_scorer("shapes", reference_dir=str(eval_setup / "reference"))
    scorer.set_reference("flat", 12, image_size=16)
    real = fid.read_image_folder(eval_setup / "reference", 16)
    blurred = [im.resize((4, 4)).resize((16, 16)) for im in real]
    assert scorer.score(real) == pytest.approx(0.0, abs=1e-3)
    assert scorer.score(blurred) > 0.01


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(methods=["guide", "magic"]), "unknown method"),
        (dict(images=1), "images must be >= 2"),
        (dict(scales=[0.5]), "guidance scales must be >= 1"),
    ],
)
def test_bad_eval_settings_fail_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**overrides)


def test_missing_guide_and_empty_prompt_file_fail_before_sampling(eval_setup, tmp_path, capsys):
    assert main(["eval", "--base", str(eval_setup / "base"), "--guide", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["eval", "--base", str(eval_setup / "base"), "--methods", "cfg", "--prompts", str(empty), "--out-dir", str(tmp_path / "o")]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resolution_mismatch_with_the_feature_network_is_a_clear_error(eval_setup, tmp_path):
    ShapesFeatureNet(channels=(8, 16), num_features=8, image_size=64).save_pretrained(tmp_path / "features")  # base makes 16x16
    with pytest.raises(ValueError, match="16x16 images but the shapes-features FID features take 64x64"):
        run_eval(_config(eval_setup, methods=["cfg"], reference=None))


def test_model_specs():
    assert parse_model_spec("pastel-full").style == "pastel"
    assert parse_model_spec("outline-lora").lora is not None
    with pytest.raises(FileNotFoundError, match="shipped models"):
        parse_model_spec("/no/such/model")


def test_model_spec_options(tiny_base_dir):
    spec = parse_model_spec(f"{tiny_base_dir},style=pastel,name=mine")
    assert (spec.base, spec.style, spec.name, spec.lora) == (str(tiny_base_dir), "pastel", "mine", None)
    with pytest.raises(ValueError, match="bad model option"):
        parse_model_spec(f"{tiny_base_dir},colour=red")
    with pytest.raises(ValueError, match="unknown style"):
        parse_model_spec(f"{tiny_base_dir},style=cubist")


def test_eval_prompts_follow_the_held_out_distribution():
    from pnpguide.evaluation.evaluate import eval_prompts

    prompts = eval_prompts(EvalConfig(images=200))
    objects = [p.count(" of ") + p.count(" above ") + p.count(" below ") for p in prompts]
    assert 0.3 < np.mean([o > 0 for o in objects]) < 0.7  # one- and two-object captions, as in the data
    assert all(shapes.is_held_out(shapes.sample_scene(i, 777, "heldout").combination) for i in range(20))


def test_guides_with_the_same_folder_name_get_distinct_method_names():
    from pathlib import Path

    from pnpguide.evaluation.evaluate import _distinct_names

    assert _distinct_names([Path("runs/a/guide-16"), Path("runs/b/guide-16"), Path("x/tiny")]) == ["a/guide-16", "b/guide-16", "tiny"]


def test_speed_is_timed_with_the_policy_the_images_were_sampled_with(eval_setup, monkeypatch):
    """The seconds per image of a row are those of sampling as its images were: a carried row's calls carry the policy."""
    from pnpguide.evaluation import evaluate
    from pnpguide.pipeline import PlugAndPlayPipeline

    policies, call = [], PlugAndPlayPipeline.__call__
    monkeypatch.setattr(PlugAndPlayPipeline, "__call__", lambda self, *a, **k: policies.append(k.get("policy")) or call(self, *a, **k))
    timed = []
    monkeypatch.setattr(evaluate, "median_seconds", lambda function, repeats, warmup: timed.append(len(policies)) or function() and 1.0)
    monkeypatch.setattr(evaluate, "peak_memory_bytes", lambda function: timed.append(len(policies)) or function() and 0)
    run_eval(_config(eval_setup, scales=[4.0], guide=[], methods=["cfg"], correction_carry=[1], speed=True, images=2))
    carried = [i for i in timed if policies[i] is not None]
    assert carried and all(policies[i].carry.full_steps == 1 for i in carried)


def test_grid_prompts_zero_writes_the_report_without_a_grid(eval_setup):
    run_eval(_config(eval_setup, scales=[4.0], guide=[str(eval_setup / "trained")], grid_prompts=0))
    out = eval_setup / "out"
    assert (out / "report.json").is_file() and not list(out.glob("grid-*.png"))


def test_negative_grid_prompts_is_refused_before_anything_loads(eval_setup):
    with pytest.raises(ValueError, match="grid_prompts must be >= 0"):
        _config(eval_setup, grid_prompts=-1)


def test_rows_in_fewer_steps_also_report_their_image_gap_against_cfg_at_the_most_steps(eval_setup):
    """A few-step guide is measured against 50-step CFG (relative to 50-step unguided images) as well
    as against CFG at its own steps. A zero-initialised guide samples as no guidance does, against either reference."""
    result = run_eval(_config(eval_setup, steps=[2, 4], scales=[4.0], guide=[str(eval_setup / "two-step")]))
    cfg2, cfg4, none2, none4, guided = (_row(result, m, steps=s, w=w) for m, s, w in
                                        [("cfg", 2, 4.0), ("cfg", 4, 4.0), ("none", 2, 1.0), ("none", 4, 1.0), ("guide:two-step", 2, 4.0)])
    assert cfg4["reference_image_gap_closed"] is None and none4["reference_image_gap_closed"] is None  # the reference itself
    assert none2["image_gap_closed"] == pytest.approx(0.0, abs=1e-9)  # against CFG at 2 steps: none is the baseline
    assert none2["reference_image_gap_closed"] != pytest.approx(0.0, abs=1e-6)  # against 4 steps: 2 steps are not 4
    assert guided["reference_image_gap_closed"] == pytest.approx(none2["reference_image_gap_closed"])
    assert cfg2["reference_image_gap_closed"] is not None and cfg2["reference_image_gap_closed"] < 1
    assert "| image gap closed | image gap vs CFG@4 | step gap closed |" in (eval_setup / "out" / "report.md").read_text()


def test_a_run_without_cfg_says_its_gap_was_not_measured(eval_setup):
    run_eval(_config(eval_setup, scales=[4.0], guide=[str(eval_setup / "trained")], methods=["guide"], grid_prompts=0))
    report = (eval_setup / "out" / "report.md").read_text()
    assert "Gap closed: not measured, since this run sampled no CFG" in report and "on the first 0 images" not in report
