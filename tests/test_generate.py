"""`pnpguide generate` on a random SD 1.5-layout folder: dtypes, sizes, several images, samplers, negative prompts,
and the errors that must come before anything loads."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

import pnpguide.loading as loading
from conftest import subprocess_env
from pnpguide.cli import main
from pnpguide.generate import GenerateRequest, generate
from pnpguide import GuideModel, PlugAndPlayPipeline, ResidualGuide
from pnpguide.loading import default_base_dir, load_plug_and_play, shipped_guides


@pytest.fixture(scope="module")
def zero_guide(sd15_dir, tmp_path_factory):
    """An untrained (zero-initialised) residual guide for the SD 1.5-layout UNet, saved as a guide folder."""
    folder = tmp_path_factory.mktemp("guide") / "paper"
    ResidualGuide.from_unet(UNet2DConditionModel.from_pretrained(str(sd15_dir / "unet"))).save_pretrained(str(folder))
    return folder


def _generate(base, guide, out, *flags) -> int:
    return main(["--threads", "1", "generate", "--prompt", "a red cat", "--base", str(base), "--guide", str(guide),
                 "--steps", "2", "--out", str(out), *flags])


def test_bfloat16_generate_at_a_non_square_size(sd15_dir, zero_guide, tmp_path):
    out = tmp_path / "image.png"
    assert _generate(sd15_dir, zero_guide, out, "--dtype", "bfloat16", "--device", "cpu", "--height", "64", "--width", "128") == 0
    assert Image.open(out).size == (128, 64)  # PIL: (width, height)


def test_num_images_writes_numbered_files_and_image_i_keeps_seed_plus_i(sd15_dir, zero_guide, tmp_path):
    assert _generate(sd15_dir, zero_guide, tmp_path / "many" / "cat.png", "--num-images", "3", "--seed", "5") == 0
    assert _generate(sd15_dir, zero_guide, tmp_path / "one.png", "--seed", "6") == 0
    files = sorted((tmp_path / "many").iterdir())
    assert [f.name for f in files] == ["cat-0.png", "cat-1.png", "cat-2.png"]
    pixels = [np.asarray(Image.open(f), dtype=np.int16) for f in files]
    assert all(np.abs(pixels[i] - pixels[j]).max() > 8 for i, j in ((0, 1), (0, 2), (1, 2)))  # three different noises
    # image 1 of seed 5 is image 0 of seed 6, up to the rounding of a batch of 3 against a batch of 1
    assert np.abs(pixels[1] - np.asarray(Image.open(tmp_path / "one.png"), dtype=np.int16)).max() <= 2


@pytest.mark.parametrize("name, class_name", [("euler-ancestral", "EulerAncestralDiscreteScheduler"), ("dpm++-2m", "DPMSolverMultistepScheduler")])
def test_scheduler_names_swap_the_sampler_and_keep_the_base_schedule(sd15_dir, zero_guide, tmp_path, name, class_name):
    pipe = load_plug_and_play(sd15_dir, zero_guide)
    betas = pipe.scheduler.config.beta_end
    generate(pipe, GenerateRequest("a red cat", str(tmp_path / "x.png"), steps=2, scheduler=name))
    assert type(pipe.scheduler).__name__ == class_name and pipe.scheduler.config.beta_end == betas
    assert (tmp_path / "x.png").is_file()


def test_a_negative_prompt_is_ignored_with_a_warning_in_guide_mode_only(sd15_dir, zero_guide):
    pipe = load_plug_and_play(sd15_dir, zero_guide)
    with pytest.warns(UserWarning, match="negative_prompt is ignored in guide mode"):
        guided = pipe("a red cat", negative_prompt="blue", num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    plain = pipe("a red cat", num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert torch.equal(guided.images, plain.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cfg mode uses it: no warning
        pipe("a red cat", negative_prompt="blue", mode="cfg", num_inference_steps=2, output_type="latent")


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--height", "96"], "multiples of 64"),
        (["--width", "80", "--height", "64"], "multiples of 64"),
        (["--scheduler", "warp-drive"], "unknown scheduler 'warp-drive'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    ],
)
def test_bad_size_scheduler_device_or_dtype_exit_2_in_one_line_before_loading(sd15_dir, zero_guide, tmp_path, monkeypatch, capsys, flags, words):
    monkeypatch.setattr(loading, "load_guide", lambda *a, **k: pytest.fail("the guide was loaded"))
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the base was loaded"))
    assert _generate(sd15_dir, zero_guide, tmp_path / "x.png", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_exits_2_before_loading(sd15_dir, zero_guide, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the base was loaded"))
    assert _generate(sd15_dir, zero_guide, tmp_path / "x.png", "--device", "cuda") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU" in err and "--device cpu" in err


@pytest.mark.parametrize("command", [["demo"], ["embedded", "base-grid", "--out", "x.png"], ["embedded", "base-adherence"], ["eval"], ["generate", "--prompt", "x"]])
def test_every_sampling_command_refuses_an_unknown_device_before_loading(command, monkeypatch, capsys):
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(loading, "load_guide", lambda *a, **k: pytest.fail("a guide was loaded"))
    assert main([*command, "--device", "tpu", "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown device 'tpu'" in err


def test_the_cli_says_once_in_one_line_that_guide_mode_ignores_the_negative_prompt(sd15_dir, zero_guide, tmp_path):
    command = [sys.executable, "-m", "pnpguide.cli", "--threads", "1", "generate", "--prompt", "a red cat", "--base", str(sd15_dir),
               "--guide", str(zero_guide), "--steps", "2", "--num-images", "2", "--negative-prompt", "blue", "--out", str(tmp_path / "x.png")]
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "negative" in line]
    assert lines == ["pnpguide generate: warning: negative_prompt is ignored in guide mode: this guide was distilled against the "
                     "empty prompt only (it has no negative head); use mode='cfg' to apply it, or a guide with a negative head (the default one)"]


@pytest.mark.integration
@pytest.mark.parametrize("name", list(shipped_guides()))
def test_python_and_the_shell_sample_the_same_image_from_a_shipped_guide(name, tmp_path):
    """The guide's folder holds its whole policy (first steps + carry, grid, interval): `pnpguide generate --guide NAME` and
    a plain Python call on `GuideModel.from_pretrained(NAME)` give the same image for the same seed."""
    assert main(["--threads", "1", "generate", "--prompt", "a red circle above a blue square on a black background", "--guide", name,
                 "--seed", "3", "--out", str(tmp_path / "shell.png")]) == 0
    pipe = PlugAndPlayPipeline.from_pretrained(default_base_dir(), guide=GuideModel.from_pretrained(name))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle above a blue square on a black background", generator=torch.Generator().manual_seed(3)).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "shell.png")), np.asarray(image))
