"""Bad arguments and input files are refused before any model is loaded or the output folder is created, in one
line with exit code 2; and the notices a user needs (resume found nothing, prompts cut, sampling progress)."""

import logging

import pytest

from conftest import distill_flags
from pnpguide import cli, distill_guidance, loading
from pnpguide.embedded import finetune
from pnpguide.cli import main
from pnpguide.guide import OutputGuide
from pnpguide.pipeline import PlugAndPlayPipeline

LONG_PROMPT = " ".join(["a red circle above a blue square"] * 6)  # 36 words, the tiny tokenizer's limit is 16


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for module in (distill_guidance, finetune):
        monkeypatch.setattr(module, "load_pipeline", refuse)


def _non_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("un cercle élevé\n".encode("latin-1"))
    return path


def _blank(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n  \n")
    return path


BAD_DISTILL = [
    (lambda tmp: dict(trajectories=0), "trajectories must be >= 1, got 0"),
    (lambda tmp: dict(trajectory_steps=-3), "trajectory_steps must be >= 1, got -3"),
    (lambda tmp: dict(design="latent"), "design must be one of output, residual, got 'latent'"),
    (lambda tmp: dict(loss_weighting="relative"), "loss_weighting must be one of"),
    (lambda tmp: dict(negative_prompts=tmp / "prompts.txt"), "--negative-prompts are drawn for a negative head: pass --negative-head"),
    (lambda tmp: dict(negative_head=True), "negative_head adds a head for the negative prompt to a trained output guide: give --init-guide"),
    (lambda tmp: dict(prompts=_non_utf8(tmp)), "is not UTF-8 text"),
    (lambda tmp: dict(prompts=_blank(tmp)), "has no prompts"),
    (lambda tmp: dict(prompts=tmp / "missing.txt"), "does not exist"),
    (lambda tmp: dict(base=tmp / "no-base"), "does not exist"),
    (lambda tmp: dict(init_guide=tmp / "no-guide"), "does not exist"),
    (lambda tmp: dict(resume=tmp / "checkpoint-9"), "checkpoint"),
    (lambda tmp: dict(source="shapes"), "source 'shapes' is the embedded model's own training data"),
    (lambda tmp: dict(lr_scheduler="cosine-ish"), "lr_scheduler must be one of"),
]


@pytest.mark.parametrize("flags, message", BAD_DISTILL)
def test_bad_distill_input_is_refused_before_loading_or_writing(tiny_base_dir, prompt_file, tmp_path, capsys, no_model_loading, flags, message):
    run = tmp_path / "run"
    assert main(distill_flags(tiny_base_dir, prompt_file, run, **flags(tmp_path))) == 2
    err = capsys.readouterr().err
    assert err.startswith("pnpguide distill: error:") and message in err and err.count("\n") == 1
    assert not run.exists()


@pytest.mark.parametrize("command, flags, message", [
    (["embedded", "finetune", "--num-images", "0"], [], "num_images must be >= 1, got 0"),
    (["embedded", "finetune", "--caption-dropout", "1.5"], [], "caption_dropout must be in [0, 1], got 1.5"),
    (["embedded", "train-base", "--vae-dir"], ["missing-vae"], "is not a saved model folder"),
    (["distill-steps", "--teacher-steps", "0"], [], "teacher_steps must be >= 1, got 0"),
    (["distill-steps", "--guide"], ["missing-guide"], "does not exist"),
    (["embedded", "train-features", "--degraded-fraction", "2"], [], "degraded_fraction must be in [0, 1], got 2.0"),
    (["distill", "--trajectories", "many"], [], "argument --trajectories: invalid int value: 'many'"),
])
def test_other_training_commands_check_their_input_first(tmp_path, capsys, no_model_loading, command, flags, message):
    run = tmp_path / "run"
    assert main(command + [str(tmp_path / f) for f in flags] + ["--output-dir", str(run), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not run.exists()


def test_debug_shows_the_traceback_instead(tmp_path):
    for argv in (["--debug", "generate"], ["generate", "--debug"]):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            main(argv + ["--prompt", "a red circle", "--guide", str(tmp_path / "missing")])


def test_resume_latest_with_nothing_to_resume_says_so_and_starts_fresh(tiny_base_dir, prompt_file, tmp_path, caplog):
    run = tmp_path / "run"
    assert main(distill_flags(tiny_base_dir, prompt_file, run, resume="latest")) == 0
    notices = [r.getMessage() for r in caplog.records if "--resume latest" in r.getMessage()]
    assert notices == [f"--resume latest: no checkpoint in {run} yet; starting from step 0"]
    assert (run / "guide").is_dir()


@pytest.fixture
def transformers_log():
    """transformers logs through its own handler, not to the root logger: listen to it directly."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_prompts_cut_by_the_tokenizer_get_one_notice_of_ours(tiny_components, caplog, transformers_log):
    pipe = PlugAndPlayPipeline(**tiny_components)
    loading.encode_captions(pipe, [LONG_PROMPT, "a red circle", LONG_PROMPT + " on a black background"])
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("pnpguide")]
    assert ours == ["2 of 3 prompts are longer than the tokenizer's limit of 16 tokens and were cut to it"]
    assert not [r for r in transformers_log if "indexing errors" in r.getMessage()]


def test_generate_shows_a_progress_bar_and_the_cut_notice(tiny_components, tmp_path, capsys, caplog, monkeypatch):
    pipe = PlugAndPlayPipeline(**tiny_components, guide=OutputGuide.from_unet(tiny_components["unet"]))
    pipe.set_progress_bar_config(disable=True)  # as load_plug_and_play returns it
    monkeypatch.setattr(loading, "load_plug_and_play", lambda *args: pipe)
    monkeypatch.setattr(cli, "PROGRESS_DELAY_S", 0)  # the bar appears after this long; the tiny model is quicker
    assert main(["generate", "--prompt", LONG_PROMPT, "--steps", "3", "--out", str(tmp_path / "x.png")]) == 0
    err = capsys.readouterr().err
    assert "sampling: 100%" in err and "3/3" in err
    assert "1 of 1 prompts are longer than the tokenizer's limit of 16 tokens" in caplog.text
