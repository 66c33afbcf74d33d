import os
import re
import signal
import subprocess
import sys
import warnings

import pytest
from PIL import Image

from pnpguide.cli import main


@pytest.mark.parametrize("command", [["demo"], ["generate"], ["distill"], ["distill-steps"], ["fit-carry"], ["eval"], ["doctor"], ["embedded"],
                                     ["embedded", "train-vae"], ["embedded", "train-base"], ["embedded", "finetune"], ["embedded", "train-features"],
                                     ["embedded", "judge-accuracy"], ["embedded", "base-grid"], ["embedded", "base-adherence"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "show this help message" in capsys.readouterr().out


def test_help_shows_the_product_commands_and_the_embedded_worlds_in_two_groups(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    commands = out[out.index("positional arguments"):out.index("options:")]
    assert "demo" in commands and "embedded" in commands and "train-base" not in commands
    assert "embedded model    embedded train-vae | train-base" in out


def test_distill_help_documents_each_flag_from_the_config_comments(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "guidance scales are drawn uniformly from [w_min, w_max]" in out
    assert "(default: 2.0)" in out


@pytest.mark.parametrize("command", [["distill"], ["distill-steps"], ["embedded", "finetune"], ["eval"]])
def test_a_flag_whose_comment_states_its_default_states_it_once(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: the embedded model)" in out or "(default: every guide shipped" in out
    assert not re.search(r"\(default: [^)]*\) \(default:", out)  # a second default would follow the comment's own


def test_user_errors_are_one_line_messages_with_exit_code_2(tmp_path, capsys):
    code = main(["generate", "--prompt", "a red circle on a black background", "--guide", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("pnpguide generate: error:") and "does not exist" in err and "\n" not in err


def _ctrl_c_that_torch_turns_into(error: Exception):
    def handler(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 0)  # let the handler run here, as inside a C call
        except KeyboardInterrupt:
            raise error  # as torch.tensor's "could not determine the shape of object type ..." does
    return handler


@pytest.fixture
def python_default_sigint():
    """As in a terminal, whatever started pytest: a background job (nohup, CI runners) inherits SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("error", [ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'"),
                                   TypeError("an error that is not a user error")])
def test_a_ctrl_c_that_c_code_turns_into_another_error_is_still_an_interruption(error, monkeypatch, capsys, python_default_sigint):
    monkeypatch.setattr("pnpguide.cli.cmd_doctor", _ctrl_c_that_torch_turns_into(error))
    assert main(["doctor"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "pnpguide doctor: interrupted"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back for the caller


def test_without_a_ctrl_c_the_same_error_is_reported_as_an_error(monkeypatch, capsys):
    def handler(args):
        raise ValueError("could not determine the shape")
    monkeypatch.setattr("pnpguide.cli.cmd_doctor", handler)
    assert main(["doctor"]) == 2
    assert capsys.readouterr().err.strip() == "pnpguide doctor: error: could not determine the shape"


def test_bad_config_value_is_a_clear_error(capsys):
    assert main(["distill", "--w-min", "9", "--w-max", "2"]) == 2
    assert "1 <= w_min <= w_max <= 14" in capsys.readouterr().err


def test_console_script_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "pnpguide.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "demo" in result.stdout


def test_help_imports_neither_diffusers_nor_transformers():
    """`pnpguide --help` lists the commands without importing the libraries that make it slow."""
    code = "import sys; from pnpguide.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint(sorted(m for m in ('diffusers', 'transformers', 'accelerate') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("[]"), result.stdout[-300:] + result.stderr[-300:]


def test_a_command_help_lists_its_config_flags_without_library_noise():
    result = subprocess.run([sys.executable, "-m", "pnpguide.cli", "distill", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "--w-min" in result.stdout and "--source" in result.stdout
    assert "torchvision" not in result.stderr, result.stderr[-500:]


@pytest.mark.integration
def test_generate_writes_an_image_with_the_shipped_guide(tmp_path):
    out = tmp_path / "x.png"
    assert main(["generate", "--prompt", "a red circle above a blue square on a black background", "--steps", "8", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)


def test_list_flags_repeat_or_take_several_values_and_default_when_absent():
    from pnpguide.cli import build_parser, config_from_args
    from pnpguide.evaluation.evaluate import EvalConfig

    parser = build_parser()
    config = config_from_args(EvalConfig, parser.parse_args(["eval", "--base", "a", "--base", "b", "c", "--steps", "8", "16"]))
    assert config.base == ["a", "b", "c"] and config.steps == [8, 16]
    assert config_from_args(EvalConfig, parser.parse_args(["eval"])).base == ["embedded"]


@pytest.mark.integration
def test_generate_with_a_step_distilled_guide_uses_its_step_count_without_warning(tmp_path, recwarn, monkeypatch):
    from diffusers import UNet2DConditionModel

    calls, forward = [], UNet2DConditionModel.forward
    monkeypatch.setattr(UNet2DConditionModel, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    assert main(["generate", "--prompt", "a red circle on a black background", "--guide", "8-step", "--out", str(tmp_path / "x.png")]) == 0
    assert len(calls) == 8
    assert not [w for w in recwarn if "step-distilled" in str(w.message)]


def test_generate_with_zero_steps_is_an_error_not_the_default(tmp_path, capsys):
    assert main(["generate", "--prompt", "a red circle on a black background", "--steps", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert "argument --steps: must be >= 1, got 0" in capsys.readouterr().err  # checked before the model is loaded
    assert not (tmp_path / "x.png").exists()


@pytest.fixture
def tiny_guide_dir(tiny_components, tmp_path):
    from pnpguide import ResidualGuide

    ResidualGuide.from_unet(tiny_components["unet"]).save_pretrained(tmp_path / "guide")
    return tmp_path / "guide"


def _unet_batches(monkeypatch) -> list[int]:
    from diffusers import UNet2DConditionModel

    batches, forward = [], UNet2DConditionModel.forward
    monkeypatch.setattr(UNet2DConditionModel, "forward", lambda self, x, *a, **k: batches.append(x.shape[0]) or forward(self, x, *a, **k))
    return batches


def test_generate_guides_only_inside_a_guidance_interval(tiny_base_dir, tiny_guide_dir, tmp_path, monkeypatch):
    from pnpguide import ResidualGuide

    timesteps, forward = [], ResidualGuide.forward
    monkeypatch.setattr(ResidualGuide, "forward", lambda self, *a, **k: timesteps.append(int(a[1])) or forward(self, *a, **k))
    flags = ["--base", str(tiny_base_dir), "--guide", str(tiny_guide_dir), "--steps", "4", "--out", str(tmp_path / "x.png")]
    assert main(["generate", "--prompt", "a red circle", *flags, "--guidance-interval", "700", "1000"]) == 0
    assert timesteps == [999, 749]  # 499 and 249 are outside: the plain UNet there


def _fitted_carry(tiny_base_dir, path, full_steps=1, steps=4):
    from pnpguide import CorrectionCarry
    from pnpguide.loading import load_plug_and_play

    pipe = load_plug_and_play(str(tiny_base_dir), None)
    return CorrectionCarry.fit(pipe, ["a red circle", "a blue square"], full_steps=full_steps, num_inference_steps=steps).save(path)


def test_generate_samples_cfg_with_a_saved_carry_in_one_pass_after_its_full_steps(tiny_base_dir, tmp_path, monkeypatch):
    carry = _fitted_carry(tiny_base_dir, tmp_path / "carry.json")
    batches = _unet_batches(monkeypatch)
    flags = ["--base", str(tiny_base_dir), "--mode", "cfg", "--steps", "4", "--out", str(tmp_path / "x.png")]
    assert main(["generate", "--prompt", "a red circle", *flags, "--correction-carry", str(carry)]) == 0
    assert batches == [2, 1, 1, 1] and (tmp_path / "x.png").exists()


def test_generate_samples_adaptive_guidance(tiny_base_dir, tmp_path, monkeypatch):
    batches = _unet_batches(monkeypatch)
    flags = ["--base", str(tiny_base_dir), "--mode", "cfg", "--steps", "4", "--out", str(tmp_path / "x.png")]
    assert main(["generate", "--prompt", "a red circle", *flags, "--adaptive-threshold", "-0.99"]) == 0
    assert batches == [2, 1, 1, 1]


def test_a_carry_in_guide_mode_needs_an_output_guide_and_says_so_before_sampling(tiny_base_dir, tiny_guide_dir, tmp_path, capsys):
    carry = _fitted_carry(tiny_base_dir, tmp_path / "carry.json")
    flags = ["--base", str(tiny_base_dir), "--steps", "4", "--out", str(tmp_path / "x.png"), "--correction-carry", str(carry)]
    assert main(["generate", "--prompt", "a red circle", "--guide", str(tiny_guide_dir), *flags]) == 2
    assert "a carry in guide mode carries an output guide's correction on, and this is a residual guide" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_generate_uses_the_carry_in_a_first_steps_guides_folder_at_any_step_count(tiny_base_dir, tmp_path, monkeypatch):
    """A guide distilled on the first steps samples them and then carries its correction on, from its own folder, with no
    flag; another step count reads the carry at its own timesteps."""
    from pnpguide import CorrectionCarry, OutputGuide
    from pnpguide.loading import load_plug_and_play

    pipe = load_plug_and_play(str(tiny_base_dir), None)
    guide = OutputGuide.from_unet(pipe.unet)
    guide.register_to_config(trained_first_steps=1)
    guide.correction_carry = CorrectionCarry.load(_fitted_carry(tiny_base_dir, tmp_path / "carry.json"))
    guide.save_pretrained(tmp_path / "first-steps")
    guide_calls, forward = [], OutputGuide.forward
    monkeypatch.setattr(OutputGuide, "forward", lambda self, *a, **k: guide_calls.append(int(a[1][0])) or forward(self, *a, **k))
    flags = ["--base", str(tiny_base_dir), "--guide", str(tmp_path / "first-steps"), "--out", str(tmp_path / "x.png")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["generate", "--prompt", "a red circle", *flags]) == 0  # the carry's 4 steps by default
        assert main(["generate", "--prompt", "a red circle", *flags, "--steps", "8"]) == 0
    assert guide_calls == [999, 999]  # the guide where it learnt (t >= 999, its one step of 4), then carried


def test_fit_carry_writes_a_carry_that_generate_samples_with(tiny_base_dir, tmp_path, capsys):
    from pnpguide import CorrectionCarry

    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    out = tmp_path / "carry.json"
    assert main(["fit-carry", "--base", str(tiny_base_dir), "--prompts", str(tmp_path / "prompts.txt"), "--steps", "4", "--full-steps", "2",
                 "--scheduler", "ddim", "--out", str(out)]) == 0
    carry = CorrectionCarry.load(out)
    assert carry.full_steps == 2 and len(carry.factors) == 4 and f"written to {out}" in capsys.readouterr().out
    flags = ["--base", str(tiny_base_dir), "--mode", "cfg", "--scheduler", "ddim", "--out", str(tmp_path / "x.png")]
    assert main(["generate", "--prompt", "a red circle", *flags, "--steps", "4", "--correction-carry", str(out)]) == 0
    assert main(["generate", "--prompt", "a red circle", *flags, "--steps", "3", "--correction-carry", str(out)]) == 0  # read at 3 steps


@pytest.mark.parametrize("flags, message", [
    (["--base", "BASE"], "fit-carry with --base needs --prompts FILE"),
    (["--prompts", "missing.txt"], "missing.txt"),
    (["--scheduler", "fast"], "fast"),
])
def test_fit_carry_errors_are_one_line_and_come_before_the_weights_load(tiny_base_dir, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setattr("pnpguide.loading.load_plug_and_play", lambda *args, **kwargs: pytest.fail("loaded the weights"))
    flags = [str(tiny_base_dir) if flag == "BASE" else str(tmp_path / flag) if flag.endswith(".txt") else flag for flag in flags]
    assert main(["fit-carry", *flags, "--out", str(tmp_path / "carry.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pnpguide fit-carry: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "carry.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--correction-carry", "carry.json", "--mode", "none"], "--correction-carry carries CFG's or the guide's correction on: it needs --mode cfg or guide, not --mode none"),
    (["--correction-carry", "missing.json", "--mode", "cfg"], "missing.json is not a saved CorrectionCarry"),
    (["--guidance-interval", "600", "200"], "interval must be (t_low, t_high) with 0 <= t_low <= t_high <= 1000"),
    (["--adaptive-threshold", "0.9"], "--adaptive-threshold compares CFG's two passes: it needs --mode cfg, not --mode guide"),
    (["--adaptive-threshold", "3", "--mode", "cfg"], "adaptive_threshold must be a cosine in (-1, 1], got 3.0"),
])
def test_bad_policy_flags_are_one_line_errors_with_exit_code_2_before_loading(tiny_base_dir, tiny_guide_dir, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setattr("pnpguide.loading.load_plug_and_play", lambda *args, **kwargs: pytest.fail("loaded the weights"))
    out = tmp_path / "x.png"
    base = ["--base", str(tiny_base_dir), "--guide", str(tiny_guide_dir), "--steps", "4", "--out", str(out)]
    assert main(["generate", "--prompt", "a red circle", *base, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not out.exists()
