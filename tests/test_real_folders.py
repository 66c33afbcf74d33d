"""SD 1.5- and SDXL-layout folders through the loader and the commands: the pipeline class comes from the folder."""

import json
import re
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from conftest import distill_flags
from pnpguide.cli import main
from pnpguide import OutputGuide, ResidualGuide
from pnpguide.guides import text_encoder_signature
from pnpguide.loading import check_model_dir, load_pipeline, load_plug_and_play, pipeline_class
from pnpguide.pipeline import PlugAndPlayPipeline
from pnpguide.pipeline_xl import PlugAndPlayXLPipeline


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


def _edit_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_the_loader_picks_the_pipeline_class_from_model_index(sd15_dir, sdxl_dir):
    assert type(load_pipeline(sd15_dir)) is StableDiffusionPipeline
    sdxl = load_pipeline(sdxl_dir)
    assert type(sdxl) is StableDiffusionXLPipeline and sdxl.text_encoder_2 is not None and sdxl.tokenizer_2 is not None


@pytest.mark.parametrize("name", ["DiffusionPipeline", "MyFineTunedXLPipeline"])
def test_an_unknown_class_name_falls_back_on_the_components(sdxl_dir, tmp_path, name):
    folder = _copy(sdxl_dir, tmp_path)
    _edit_json(folder / "model_index.json", _class_name=name)
    assert pipeline_class(folder) is StableDiffusionXLPipeline


def test_an_unsupported_pipeline_is_one_line_naming_the_supported_ones(tmp_path):
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": [None, None]}))
    with pytest.raises(ValueError, match="FluxPipeline.*supports StableDiffusionPipeline.*StableDiffusionXLPipeline") as error:
        check_model_dir(tmp_path / "flux")
    assert "\n" not in str(error.value)


def test_an_sdxl_folder_without_its_second_encoder_is_refused_before_loading(sdxl_dir, tmp_path):
    folder = _copy(sdxl_dir, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    del index["text_encoder_2"], index["tokenizer_2"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline folder but model_index.json does not list text_encoder_2, tokenizer_2"):
        load_pipeline(folder)
    _edit_json(folder / "model_index.json", _class_name="StableDiffusionPipeline")  # its UNet still wants SDXL's conditioning
    with pytest.raises(ValueError, match="needs SDXL's second text encoder: add text_encoder_2 and tokenizer_2"):
        load_pipeline(folder)


def test_an_sdxl_folder_missing_the_tokenizer_2_folder_is_named(sdxl_dir, tmp_path):
    folder = _copy(sdxl_dir, tmp_path)
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match="tokenizer_2"):
        check_model_dir(folder)


def make_guide_dir(base_dir, folder, design=ResidualGuide):
    """An untrained (zero-initialised, valid) guide for the base's UNet, saved as `pnpguide distill` saves one."""
    pipe = load_pipeline(base_dir)
    guide = design.from_unet(pipe.unet)
    signature = text_encoder_signature(pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    guide.register_to_config(trained_guidance_range=(2.0, 8.0), trained_text_encoder=signature)
    guide.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd15_guide(sd15_dir, tmp_path_factory):
    return make_guide_dir(sd15_dir, tmp_path_factory.mktemp("guides") / "sd15")


@pytest.fixture(scope="module")
def sdxl_guide(sdxl_dir, tmp_path_factory):
    return make_guide_dir(sdxl_dir, tmp_path_factory.mktemp("guides") / "sdxl")


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_doctor_passes_a_matching_pair_and_checks_the_text_encoders(kind, request, capsys):
    base, guide = request.getfixturevalue(f"{kind}_dir"), request.getfixturevalue(f"{kind}_guide")
    assert main(["doctor", "--base", str(base), "--guide", str(guide)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "OK   conditioning kind" in out and "OK   guide fits the text encoder" in out
    encoders = next(line for line in out.splitlines() if line.startswith("OK   text encoders"))
    assert ("CLIPTextModelWithProjection" in encoders) == (kind == "sdxl")


@pytest.mark.parametrize("base, guide, words", [("sdxl", "sd15", "guide built for an SD 1.x/2.x UNet.*this base has an SDXL UNet"),
                                                ("sd15", "sdxl", "guide built for an SDXL UNet.*this base has an SD 1.x/2.x UNet")])
def test_doctor_refuses_a_guide_for_the_other_kind_of_base_before_loading(base, guide, words, request, capsys, monkeypatch):
    import pnpguide.doctor as doctor

    monkeypatch.setattr(doctor, "load_pipeline", lambda *a, **k: pytest.fail("the base was loaded"))
    monkeypatch.setattr(doctor, "load_guide", lambda *a, **k: pytest.fail("the guide was loaded"))
    args = ["doctor", "--base", str(request.getfixturevalue(f"{base}_dir")), "--guide", str(request.getfixturevalue(f"{guide}_guide"))]
    assert main(args) == 1
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and out.startswith("FAIL guide fits the base (configs)")
    assert re.search(words, out) and "pnpguide distill --base" in out


def test_doctor_fails_a_guide_distilled_with_other_sdxl_text_encoders(sdxl_dir, sdxl_guide, tmp_path, capsys):
    folder = shutil.copytree(sdxl_guide, tmp_path / "guide")
    _edit_json(folder / "config.json", trained_text_encoder="CLIPTextModel (12 layers, 768 wide, vocab 49408) + CLIPTextModelWithProjection (32 layers, 1280 wide, vocab 49408)")
    assert main(["doctor", "--base", str(sdxl_dir), "--guide", str(folder)]) == 1
    assert "FAIL guide fits the text encoder: guide was trained for another base" in capsys.readouterr().out


@pytest.mark.parametrize("base, guide", [("sdxl", "sd15"), ("sd15", "sdxl")])
def test_generate_with_a_guide_for_the_other_kind_of_base_is_one_line_before_loading(base, guide, request, capsys, monkeypatch):
    import pnpguide.loading as loading

    monkeypatch.setattr(loading, "load_guide", lambda *a, **k: pytest.fail("the guide was loaded"))
    args = ["generate", "--prompt", "a red cat", "--base", str(request.getfixturevalue(f"{base}_dir")),
            "--guide", str(request.getfixturevalue(f"{guide}_guide"))]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit base" in err and "pnpguide distill --base" in err


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_generate_cfg_on_your_own_base_needs_no_guide(base, request, tmp_path):
    """The shipped guides fit only the embedded model, so a user's base without --guide samples CFG (or none) alone."""
    out = tmp_path / "cfg.png"
    assert main(["--threads", "1", "generate", "--prompt", "a red cat", "--base", str(request.getfixturevalue(f"{base}_dir")),
                 "--mode", "cfg", "--steps", "2", "--out", str(out)]) == 0
    assert out.is_file()


def test_generate_guide_mode_on_your_own_base_without_a_guide_is_one_line_before_loading(sd15_dir, capsys, monkeypatch):
    import pnpguide.loading as loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the base was loaded"))
    assert main(["generate", "--prompt", "a red cat", "--base", str(sd15_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs --guide" in err and "--mode cfg" in err


@pytest.mark.parametrize("design", [ResidualGuide, OutputGuide])
def test_generate_on_an_sdxl_folder_with_a_guide_at_a_non_square_size(sdxl_dir, tmp_path, design):
    guide = make_guide_dir(sdxl_dir, tmp_path / "guide", design)
    out = tmp_path / "image.png"
    assert main(["--threads", "1", "generate", "--prompt", "a red cat", "--base", str(sdxl_dir), "--guide", str(guide),
                 "--steps", "2", "--height", "48", "--width", "80", "--out", str(out)]) == 0
    assert Image.open(out).size == (80, 48)


def test_load_plug_and_play_builds_the_xl_pipeline_for_sdxl(sdxl_dir, sdxl_guide, sd15_dir, sd15_guide):
    assert type(load_plug_and_play(sdxl_dir, sdxl_guide)) is PlugAndPlayXLPipeline
    assert type(load_plug_and_play(sd15_dir, sd15_guide)) is PlugAndPlayPipeline


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_eval_on_a_real_folder_skips_the_shapes_metrics_and_reports_the_gaps(kind, request, tmp_path):
    base, guide = request.getfixturevalue(f"{kind}_dir"), request.getfixturevalue(f"{kind}_guide")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na cat on a car\n")
    out = tmp_path / "eval"
    args = ["--threads", "1", "eval", "--base", str(base), "--guide", str(guide), "--prompts", str(prompts), "--images", "2",
            "--steps", "2", "--scales", "3", "--no-speed", "--json", "--out-dir", str(out)]
    assert main(args) == 0
    result = json.loads((out / "report.json").read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == {"none", "cfg", f"guide:{guide.name}"}
    assert all(row["fid"] is None and row["adherence"] is None for row in rows.values())
    assert rows["cfg"]["step_gap_closed"] == pytest.approx(1.0) and rows["none"]["step_gap_closed"] == pytest.approx(0.0)
    untrained = rows[f"guide:{guide.name}"]  # a zero-initialised guide is exactly the conditional model
    assert untrained["image_gap_closed"] == pytest.approx(0.0, abs=1e-6) and untrained["step_gap_closed"] == pytest.approx(0.0, abs=1e-6)
    steps = rows["none"]["unet_evals_per_image"]  # PNDM (SD 1.5's) takes one more model call than its step count
    assert rows["cfg"]["unet_evals_per_image"] == 2 * steps and untrained["unet_evals_per_image"] == steps == untrained["guide_evals_per_image"]
    report = (out / "report.md").read_text()
    assert "image gap closed" in report and "step gap closed" in report
    assert "not of the embedded shapes world: adherence (the shapes judge) and FID" in report and "FID features" not in report


def test_distill_on_sdxl_records_both_text_encoders_and_the_guide_passes_doctor_and_generates(sdxl_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na cat on a car\n")
    run = tmp_path / "run"
    assert main(distill_flags(sdxl_dir, prompts, run, trajectories=4, trajectory_steps=2, max_steps=2, batch_size=2, checkpointing_steps=2)) == 0
    recorded = json.loads((run / "guide" / "config.json").read_text())["trained_text_encoder"]
    assert recorded.startswith("CLIPTextModel (") and "+ CLIPTextModelWithProjection (" in recorded
    assert main(["doctor", "--base", str(sdxl_dir), "--guide", str(run / "guide")]) == 0
    assert "FAIL" not in capsys.readouterr().out
    out = tmp_path / "image.png"
    assert main(["--threads", "1", "generate", "--prompt", "a cat", "--base", str(sdxl_dir), "--guide", str(run / "guide"), "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize("kind, height, width", [("sd15", 64, 128), ("sdxl", 48, 80)])
def test_an_output_guide_distilled_on_a_real_folder_passes_doctor_and_generates_at_a_non_square_size(kind, height, width, request, tmp_path, capsys):
    base = request.getfixturevalue(f"{kind}_dir")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na cat on a car\n")
    run = tmp_path / "run"
    assert main(distill_flags(base, prompts, run, trajectories=4, trajectory_steps=2, max_steps=2, batch_size=2, checkpointing_steps=2)) == 0
    assert json.loads((run / "guide" / "config.json").read_text())["_class_name"] == "OutputGuide"
    assert main(["doctor", "--base", str(base), "--guide", str(run / "guide")]) == 0
    out_text = capsys.readouterr().out
    assert "FAIL" not in out_text and "OK   residuals: none: the guide corrects the UNet's 4-channel output" in out_text
    out = tmp_path / "image.png"
    assert main(["--threads", "1", "generate", "--prompt", "a cat", "--base", str(base), "--guide", str(run / "guide"), "--steps", "2",
                 "--height", str(height), "--width", str(width), "--out", str(out)]) == 0
    assert Image.open(out).size == (width, height)


def test_eval_with_a_guide_for_the_other_kind_of_base_is_one_line_before_loading(sdxl_dir, sd15_guide, tmp_path, capsys, monkeypatch):
    import pnpguide.evaluation.evaluate as evaluate

    monkeypatch.setattr(evaluate, "load_guide", lambda *a, **k: pytest.fail("a guide was loaded"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    args = ["eval", "--base", str(sdxl_dir), "--guide", str(sd15_guide), "--prompts", str(prompts), "--images", "2", "--out-dir", str(tmp_path / "eval")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "guide built for an SD 1.x/2.x UNet" in err and "pnpguide distill --base" in err


@pytest.mark.parametrize("change, match", [
    (("unet", {"cross_attention_dim": 48}), r'"cross_attention_dim" is 48 but the text encoders give 64-wide embeddings \(text_encoder 32 \+ text_encoder_2 32\)'),
    (("text_encoder_2", {"projection_dim": 16}), r'"projection_class_embeddings_input_dim" is 80; .* projection_dim \(16\) = 64'),
])
def test_an_sdxl_folder_whose_unet_and_text_encoders_disagree_is_refused_before_loading(sdxl_dir, tmp_path, change, match):
    folder = _copy(sdxl_dir, tmp_path)
    component, fields = change
    _edit_json(folder / component / "config.json", **fields)
    with pytest.raises(ValueError, match=match) as error:
        check_model_dir(folder)
    assert "\n" not in str(error.value)


def test_an_sdxl_folder_labelled_as_sd_names_the_fix(sdxl_dir, tmp_path):
    folder = _copy(sdxl_dir, tmp_path)
    _edit_json(folder / "model_index.json", _class_name="StableDiffusionPipeline")
    with pytest.raises(ValueError, match='names StableDiffusionPipeline but the folder is SDXL .*set "_class_name" to "StableDiffusionXLPipeline"'):
        check_model_dir(folder)


def test_cfg_mode_reproduces_diffusers_on_the_sd15_folder_with_its_pndm_scheduler(sd15_dir):
    import numpy as np

    sd = load_pipeline(sd15_dir)
    pipe = PlugAndPlayPipeline.from_pipe(sd)
    pipe.set_progress_bar_config(disable=True)
    run = lambda p, **kw: p(["a red cat", "a car"], num_inference_steps=3, guidance_scale=5.0, output_type="np",  # noqa: E731
                            generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_allclose(run(pipe, mode="cfg"), run(sd), atol=1e-5)


@pytest.mark.parametrize("kind, height, width", [("sd15", 64, 128), ("sdxl", 48, 80)])
def test_a_first_steps_guide_distilled_on_a_real_layout_folder_samples_with_its_carry_at_its_own_scheduler_and_size(kind, height, width, request, tmp_path):
    """The default recipe on SD 1.5's PNDM (leading spacing: the first step is not t = 999) and SDXL's Euler (which scales its
    input): the guide learns the teacher's first step of 3 on its DDIM grid, the carry fitted there is saved in its folder,
    and generate reads it at the base's own scheduler's timesteps."""
    base = request.getfixturevalue(f"{kind}_dir")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na cat on a car\n")
    run = tmp_path / "run"
    assert main(distill_flags(base, prompts, run, trajectories=4, trajectory_steps=3, trajectory_first_steps=1, max_steps=2, batch_size=2,
                              checkpointing_steps=2)) == 0
    assert (run / "guide" / "correction_carry.json").is_file() and (run / "guide" / "README.md").is_file()
    out = tmp_path / "image.png"
    assert main(["--threads", "1", "generate", "--prompt", "a red cat", "--base", str(base), "--guide", str(run / "guide"),
                 "--steps", "4", "--height", str(height), "--width", str(width), "--out", str(out)]) == 0
    assert Image.open(out).size == (width, height)
