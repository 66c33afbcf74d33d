import numpy as np
import pytest
from PIL import Image

from pnpguide import data
from pnpguide.evaluation import adherence


def test_parse_caption_reads_objects_relation_and_background():
    spec = adherence.parse_caption("a red circle left of an orange square on a gray background")
    assert spec.objects == (adherence.ObjectSpec("red", "circle"), adherence.ObjectSpec("orange", "square"))
    assert spec.relation == "left of" and spec.background == "gray"


@pytest.mark.parametrize("caption", ["", "a dog on a beach", "a red hexagon on a black background"])
def test_parse_caption_rejects_other_text(caption):
    with pytest.raises(ValueError):
        adherence.parse_caption(caption)


@pytest.mark.parametrize("style", data.STYLES)
def test_judge_accepts_true_and_rejects_wrong_captions(style):
    result = adherence.judge_accuracy(style, images=60)
    assert result.accepts_true_captions >= 0.95
    assert result.rejects_wrong_captions >= 0.95


def test_judge_rejects_a_swapped_relation():
    scene = data.sample_scene(1, 0)
    while scene.relation != "above":
        scene = data.sample_scene(np.random.randint(10_000), 0)
    image = data.render(scene)
    swapped = data.Scene(scene.objects, scene.background, "below", False).caption
    assert adherence.judge(image, scene.caption).ok
    assert not adherence.judge(image, swapped).ok


def test_a_blank_image_matches_nothing():
    blank = Image.new("RGB", (64, 64), data.BACKGROUNDS["black"])
    verdict = adherence.judge(blank, "a red circle on a black background")
    assert not verdict.ok and "found 0 objects" in verdict.reason
