"""`pnpguide eval --negative-prompts`: where negatives come from, the avoidance rate, and that every
method is compared with CFG *with the same negative*."""

import warnings

import numpy as np
import pytest
import torch

from pnpguide.embedded import shapes
from pnpguide.evaluation import evaluate
from pnpguide.evaluation.evaluate import EvalConfig, run_eval
from pnpguide.evaluation.gap import image_gap_closed
from pnpguide.evaluation.negative_prompts import (
    NegatedAttribute, avoidance_rate, caption_attribute_negatives, eval_negatives, parse_negative,
)
from pnpguide import OutputGuide, ResidualGuide

SAMPLE = evaluate.sample  # the real one, which _run wraps
CAPTIONS = ["a red circle on a black background", "a blue square above a green triangle on a white background",
            "a large yellow triangle on a gray background"]


def _one_line_error(**overrides) -> str:
    with pytest.raises(ValueError) as error:
        EvalConfig(**overrides)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_bad_negative_prompts_fail_in_the_config_in_one_line(tmp_path):
    assert "does not exist" in _one_line_error(negative_prompts=str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "no prompts" in _one_line_error(negative_prompts=str(empty))
    own = tmp_path / "prompts.txt"
    own.write_text("a photo of a cat\n")
    assert "needs shapes captions" in _one_line_error(negative_prompts="caption-attributes", prompts=str(own))


def test_negative_file_is_cycled_over_the_prompts(tmp_path):
    path = tmp_path / "negatives.txt"
    path.write_text("red\n\nblurry, lowres\n")
    assert eval_negatives(str(path), CAPTIONS + CAPTIONS[:2]) == ["red", "blurry, lowres", "red", "blurry, lowres", "red"]
    assert eval_negatives(None, CAPTIONS) is None
    assert EvalConfig(negative_prompts="caption-attributes", images=4).negative_prompts == "caption-attributes"  # held-out captions parse


def test_caption_attributes_name_the_first_object_colour_shape_and_both_in_turns():
    assert caption_attribute_negatives(CAPTIONS + CAPTIONS[:1]) == ["red", "square", "yellow triangle", "red"]


def test_parse_negative_reads_colours_and_shapes_only():
    assert parse_negative("Red") == NegatedAttribute("red", None)
    assert parse_negative("circles") == NegatedAttribute(None, "circle")
    assert parse_negative(" a blue square ") == NegatedAttribute("blue", "square")
    for other in ("blurry", "red blurry", "square red", "a red circle above a blue square", ""):
        assert parse_negative(other) is None, other


def _scene(*objects, background="black"):
    placed = [(20.0, 16.0), (44.0, 48.0)] if len(objects) == 2 else [(32.0, 32.0)]
    extent = 16.0 if len(objects) == 2 else 32.0
    return shapes.Scene(tuple(shapes.ShapeObject(shape, colour, centre, extent, "small" if extent < 25 else "large")
                              for (colour, shape), centre in zip(objects, placed)), background, "above" if len(objects) == 2 else None, False)


def test_avoidance_rate_counts_images_showing_the_negated_attribute():
    red_circle = shapes.render(_scene(("red", "circle")))
    pair = shapes.render(_scene(("red", "circle"), ("blue", "square")))
    cases = [  # (image, negative, avoided)
        (red_circle, "red", False), (red_circle, "circle", False), (red_circle, "red circle", False),
        (red_circle, "blue", True), (red_circle, "square", True), (red_circle, "red square", True),
        (pair, "blue square", False), (pair, "square", False), (pair, "red square", True), (pair, "blue circle", True),
    ]
    for image, negative, avoided in cases:
        assert avoidance_rate([image], [negative]) == float(avoided), negative
    images, negatives = [red_circle, red_circle, pair, pair], ["red", "blue", "blurry", "red square"]
    assert avoidance_rate(images, negatives) == pytest.approx(2 / 3)  # "blurry" is not measurable: left out
    assert avoidance_rate(images[:1], ["blurry"]) is None


@pytest.fixture
def negatives_setup(tiny_base_dir, tiny_components, tmp_path, prompt_file):
    """The tiny base, a random guide that ignores negatives and one that reads them (a negative head), and shapes prompts."""
    torch.manual_seed(0)
    for name, guide in (("plain", ResidualGuide.from_unet(tiny_components["unet"])), ("reader", OutputGuide.from_unet(tiny_components["unet"]).with_negative_head())):
        for p in guide.parameters():
            torch.nn.init.normal_(p, std=0.05)
        guide.save_pretrained(tmp_path / name)
    return tmp_path


def _run(setup, monkeypatch, **overrides):
    """run_eval with the images of every (method, seed) kept: {method name: images}."""
    images = {}

    def sample(pipe, method, *args, **kwargs):
        images[method.name] = output = SAMPLE(pipe, method, *args, **kwargs)
        return output

    monkeypatch.setattr(evaluate, "sample", sample)
    settings = dict(base=[str(setup / "base")], guide=[str(setup / "plain"), str(setup / "reader")], steps=[3], scales=[4.0], images=6,
                    batch_size=4, prompts=str(setup / "prompts.txt"), fid_features="none", speed=False, grid_prompts=2, out_dir=str(setup / "out"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_eval(EvalConfig(**(settings | overrides)))
    rows = {r["method"]: r for r in result["rows"]}
    return rows, {name: output[0] for name, output in images.items()}, [str(w.message) for w in caught]


def test_eval_with_negative_prompts_measures_every_method_against_cfg_with_the_negative(negatives_setup, monkeypatch):
    plain_rows, plain_images, _ = _run(negatives_setup, monkeypatch)
    rows, images, warned = _run(negatives_setup, monkeypatch, negative_prompts="caption-attributes")
    assert set(rows) == {"cfg", "none", "guide:plain", "guide:reader", "guide:reader (no neg)"}  # (no neg): beside a guide that reads them
    assert [rows[m]["negative_prompt"] for m in ("cfg", "none", "guide:reader", "guide:reader (no neg)")] == [True, False, True, False]

    # the teacher samples with the negatives; w = 1 does not read them
    assert not np.array_equal(np.asarray(images["cfg"][0]), np.asarray(plain_images["cfg"][0]))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images["none"], plain_images["none"]))

    # every gap is against CFG with the negative: recomputed here from the images, and the teacher replayed at its own
    # states (with the negatives it sampled with) closes the whole per-step gap
    for method in ("guide:plain", "guide:reader", "guide:reader (no neg)"):
        assert rows[method]["image_gap_closed"] == pytest.approx(image_gap_closed(images[method], images["none"], images["cfg"]))
    assert rows["cfg"]["step_gap_closed"] == pytest.approx(1.0) and rows["cfg"]["output_mse_vs_cfg"] == 0.0
    for key in ("psnr_vs_cfg_db", "output_mse_vs_cfg"):  # the same images and outputs as without negatives, another teacher
        assert rows["none"][key] != pytest.approx(plain_rows["none"][key]), key

    # a guide that ignores negatives gives the same images with and without (warning that it ignores them); one that reads them gives other outputs
    assert any("negative_prompt is ignored in guide mode" in w for w in warned)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images["guide:plain"], plain_images["guide:plain"]))
    for key in ("step_gap_closed", "output_mse_vs_cfg"):  # the random reader's negative moves its outputs by ~1e-4: below 8-bit pixels
        assert rows["guide:reader"][key] != pytest.approx(rows["guide:reader (no neg)"][key], rel=1e-9, abs=0), key

    # the avoidance rate, per row, and the report
    for row in rows.values():
        assert row["avoids_negative"] == pytest.approx(avoidance_rate(images[row["method"]], caption_attribute_negatives(_prompts(negatives_setup))))
    assert all(r["avoids_negative"] is None for r in plain_rows.values())
    report = (negatives_setup / "out" / "report.md").read_text()
    assert "| avoids negative |" in report and "| guide:reader (no neg) |" in report and "Negative prompts: `caption-attributes`" in report
    assert "do not read negative prompts (same images with and without): guide:plain." in report
    assert (negatives_setup / "out" / "grid-base.png").is_file()


def _prompts(setup) -> list[str]:
    lines = (setup / "prompts.txt").read_text().splitlines()
    return [lines[i % len(lines)] for i in range(6)]


def test_negatives_that_name_no_colour_or_shape_are_not_measurable(negatives_setup, monkeypatch, tmp_path):
    path = tmp_path / "negatives.txt"
    path.write_text("blurry\n")
    rows, _, _ = _run(negatives_setup, monkeypatch, negative_prompts=str(path), methods=["cfg"])
    assert rows["cfg"]["avoids_negative"] is None and rows["cfg"]["step_gap_closed"] == pytest.approx(1.0)
    assert "| – |" in (negatives_setup / "out" / "report.md").read_text()


def test_eval_on_sdxl_with_negative_prompts_and_an_empty_one_that_is_no_negative(sdxl_dir, tmp_path, monkeypatch):
    """SDXL's unconditional input also holds the pooled negative; an empty negative is the pipeline's own no-negative
    input (zeros, force_zeros_for_empty_prompt), so that image is CFG's without a negative prompt."""
    from pnpguide.guides import text_encoder_signature
    from pnpguide.loading import load_pipeline

    pipe = load_pipeline(sdxl_dir)
    torch.manual_seed(0)
    guide = OutputGuide.from_unet(pipe.unet).with_negative_head()
    for p in guide.parameters():
        torch.nn.init.normal_(p, std=0.05)
    guide.register_to_config(trained_text_encoder=text_encoder_signature(pipe.text_encoder, pipe.text_encoder_2))
    guide.save_pretrained(tmp_path / "reader")
    (tmp_path / "prompts.txt").write_text("a red cat\na cat on a car\n")
    (tmp_path / "negatives.jsonl").write_text('{"prompt": "blurry"}\n{"prompt": ""}\n')
    settings = dict(base=[str(sdxl_dir)], guide=[str(tmp_path / "reader")], steps=[2], scales=[3.0], images=2)
    plain_rows, plain_images, _ = _run(tmp_path, monkeypatch, **settings)
    rows, images, _ = _run(tmp_path, monkeypatch, **settings, negative_prompts=str(tmp_path / "negatives.jsonl"))
    assert not np.array_equal(np.asarray(images["cfg"][0]), np.asarray(plain_images["cfg"][0]))
    assert np.array_equal(np.asarray(images["cfg"][1]), np.asarray(plain_images["cfg"][1]))
    assert rows["cfg"]["step_gap_closed"] == pytest.approx(1.0) and rows["cfg"]["avoids_negative"] is None
    assert rows["guide:reader"]["step_gap_closed"] != pytest.approx(rows["guide:reader (no neg)"]["step_gap_closed"], rel=1e-9, abs=0)
    assert "avoids negative: not measurable here" in (tmp_path / "out" / "report.md").read_text()


def test_generate_images_gives_each_image_its_own_negative_whatever_the_batch(tiny_components):
    from diffusers import StableDiffusionPipeline

    from pnpguide.evaluation.sampling import generate_images

    pipe = StableDiffusionPipeline(**tiny_components)
    prompts, negatives = CAPTIONS[:2], ["red", "square"]
    settings = dict(guidance_scale=4.0, num_inference_steps=2, mode="cfg", progress=False)
    apart = generate_images(pipe, prompts, batch_size=1, negative_prompts=negatives, **settings)
    together = generate_images(pipe, prompts, batch_size=2, negative_prompts=negatives, **settings)
    plain = generate_images(pipe, prompts, batch_size=2, **settings)

    def far(a, b):
        return np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() > 1  # batch sizes may round one level apart

    assert not any(far(a, b) for a, b in zip(apart, together))
    assert all(far(a, b) for a, b in zip(together, plain))


@pytest.mark.integration
def test_demo_adds_rows_with_the_negative_prompts(tmp_path):
    from pnpguide.demo import run_demo

    with pytest.raises(ValueError, match="does not exist"):
        run_demo(tmp_path, steps=2, negative_prompts=str(tmp_path / "missing.txt"))
    with pytest.warns(UserWarning, match="negative_prompt is ignored in guide mode"):  # the paper's guide has no negative head
        grid, timings = run_demo(tmp_path, steps=2, guide="paper", negative_prompts="caption-attributes")
    assert grid.is_file()
    labels = [t.label for t in timings]
    assert labels[:5] == ["no guidance (w=1)", "CFG", "guide paper", "CFG, negative", "guide paper, negative (ignored)"]
    assert timings[3].unet_images_per_image == 4 and timings[4].unet_images_per_image == 2


def test_demo_cli_refuses_a_missing_negatives_file_in_one_line_before_loading(monkeypatch, capsys, tmp_path):
    from pnpguide import demo
    from pnpguide.cli import main

    monkeypatch.setattr(demo, "load_plug_and_play", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["demo", "--out-dir", str(tmp_path), "--negative-prompts", str(tmp_path / "missing.txt")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.txt" in err


@pytest.mark.integration
def test_demo_samples_the_default_guide_with_its_own_policy(tmp_path):
    """The default guide runs its first steps (8 with a negative prompt) and carries its correction after them, from its folder."""
    import warnings

    from pnpguide.demo import run_demo

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="this guide learnt the first")
        grid, timings = run_demo(tmp_path, steps=25, negative_prompts="caption-attributes")
    labels = [t.label for t in timings]
    assert grid.is_file() and labels[:5] == ["no guidance (w=1)", "CFG", "guide default", "CFG, negative", "guide default, negative"]
    assert timings[2].unet_images_per_image == 25 and timings[3].unet_images_per_image == 50
