"""The transfer curve (`pnpguide eval --transfer`) on tiny random models: a fine-tune at scale 0 is its base."""

import json

import pytest
import torch

from pnpguide.carry import GUIDE_CARRY_FILE, CorrectionCarry
from pnpguide.cli import main
from pnpguide.embedded.finetune import FinetuneConfig, finetune
from pnpguide.evaluation.evaluate import EvalConfig, parse_model_spec, run_eval
from pnpguide.evaluation.sampling import as_plug_and_play
from pnpguide.embedded.transfer import markdown, transfer_curve
from pnpguide import OutputGuide, ResidualGuide
from pnpguide.loading import load_pipeline, save_pipeline

STEPS = 4


@pytest.fixture
def transfer_setup(tiny_base_dir, tiny_components, tmp_path):
    """A LoRA and a full fine-tune of the tiny base, a first-steps output guide with its carry, a residual guide. The base is
    stored in fp16 as the full fine-tune is, so that the two share their VAE and text encoder to the bit."""
    save_pipeline(load_pipeline(tiny_base_dir), tmp_path / "base16")
    settings = dict(base=str(tmp_path / "base16"), style="flat", max_steps=3, batch_size=4, num_images=16, lr_warmup_steps=0, learning_rate=1e-2)
    finetune(FinetuneConfig(output_dir=str(tmp_path / "lora"), method="lora", **settings))
    finetune(FinetuneConfig(output_dir=str(tmp_path / "full"), method="full", **settings))
    first = OutputGuide.from_unet(tiny_components["unet"])
    first.register_to_config(trained_first_steps=2)
    torch.manual_seed(3)
    for p in first.parameters():
        torch.nn.init.normal_(p, std=0.05)
    first.save_pretrained(tmp_path / "first")
    pipe = as_plug_and_play(load_pipeline(tmp_path / "base16"))
    CorrectionCarry.fit(pipe, ["a red circle on a black background"] * 2, full_steps=2, num_inference_steps=STEPS).save(tmp_path / "first" / GUIDE_CARRY_FILE)
    residual = ResidualGuide.from_unet(tiny_components["unet"])
    for p in residual.parameters():
        torch.nn.init.normal_(p, std=0.05)
    residual.save_pretrained(tmp_path / "residual")
    return tmp_path


def _curve(setup, specs, scales):
    return transfer_curve([parse_model_spec(s) for s in specs], scales, [3.0], [str(setup / "first"), str(setup / "residual")], [2],
                          images=3, steps=STEPS, base=str(setup / "base16"), batch_size=2, fid=False, log=lambda *_: None, thresholds=[0.99])


def test_a_fine_tune_at_scale_zero_is_its_base_and_at_scale_one_is_not(transfer_setup):
    lora = f"{transfer_setup / 'base16'},lora={transfer_setup / 'lora' / 'lora'},name=lora,concept=bar"
    full = f"{transfer_setup / 'full' / 'pipeline'},name=full"
    rows, table = _curve(transfer_setup, [lora, full], [0.0, 1.0])
    assert [(r.model, r.scale, r.prompts) for r in rows] == [
        ("lora", 0.0, "ordinary"), ("lora", 0.0, "with bar"), ("lora", 1.0, "ordinary"), ("lora", 1.0, "with bar"),
        ("full", 0.0, "ordinary"), ("full", 1.0, "ordinary")]
    for row in rows:
        assert len(row.cosine_per_step) == STEPS and len(row.norm_ratio_per_step) == STEPS
        assert set(row.image_gap_closed) == {"guide:first", "guide:first + ft carry", "guide:residual", "cfg + carry 2", "cfg + AG 0.99 + carry"}
        assert {"base cfg", "cfg", "none"} <= set(row.adherence)
        if row.scale == 0:  # the base itself: its CFG images, and corrections along the base's at every step
            assert row.distance == 0
            assert row.cosine_per_step == pytest.approx([1.0] * STEPS, abs=1e-5)
            assert row.norm_ratio_per_step == pytest.approx([1.0] * STEPS, abs=1e-5)
            assert row.adherence["cfg"] == row.adherence["base cfg"]
        else:
            assert row.distance > 0 and min(row.cosine_per_step) < 1 - 1e-4
    assert "| lora | 0 | 3 | with bar | 0.000 | 1.00 / 1.00 / – |" in table  # 4 steps: no step 6
    assert table == markdown(rows)


def test_eval_transfer_flag_writes_the_curve(transfer_setup, capsys):
    out = transfer_setup / "out"
    lora = f"{transfer_setup / 'base16'},lora={transfer_setup / 'lora' / 'lora'},name=lora"
    assert main(["--threads", "1", "eval", "--transfer", "--base", lora, "--lora-scales", "0.5", "1", "--steps", str(STEPS), "--scales", "3",
                 "--images", "2", "--batch-size", "2", "--guide", str(transfer_setup / "first"), "--correction-carry", "2",
                 "--fid-features", "none", "--transfer-base", str(transfer_setup / "base"), "--out-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "transfer" and [r["scale"] for r in report["rows"]] == [0.5, 1.0]
    assert "image gap closed: guide:first / guide:first + ft carry / cfg + carry 2" in (out / "report.md").read_text()
    assert (out / "command.txt").read_text().startswith("pnpguide --threads 1 eval --transfer")
    assert (out / "curve.png").stat().st_size > 10_000 and "![image gap closed against distance](curve.png)" in (out / "report.md").read_text()


def test_transfer_takes_one_step_count(transfer_setup):
    with pytest.raises(ValueError, match="--transfer samples at one step count"):
        run_eval(EvalConfig(transfer=True, steps=[4, 8], fid_features="none"))


def test_the_shipped_concept_lora_is_a_known_model():
    spec = parse_model_spec("bar-lora")
    assert spec.concept == "bar" and spec.new_shapes == ("bar",) and spec.lora.endswith("finetunes/bar-lora")
