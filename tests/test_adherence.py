from dataclasses import replace

import pytest
from PIL import Image

from pnpguide.embedded import shapes
from pnpguide.embedded import adherence


def _two_object_scene(relation: str) -> shapes.Scene:
    return next(s for s in (shapes.sample_scene(i, 3) for i in range(1000)) if s.relation == relation)


def test_parse_caption_reads_objects_relation_and_background():
    spec = adherence.parse_caption("a red circle left of an orange square on a gray background")
    assert spec.objects == (adherence.ObjectSpec("red", "circle"), adherence.ObjectSpec("orange", "square"))
    assert spec.relation == "left of" and spec.background == "gray"


@pytest.mark.parametrize("caption", ["", "a dog on a beach", "a red hexagon on a black background"])
def test_parse_caption_rejects_other_text(caption):
    with pytest.raises(ValueError):
        adherence.parse_caption(caption)


@pytest.mark.parametrize("style", shapes.STYLES)
def test_judge_accepts_true_and_rejects_wrong_captions(style):
    result = adherence.judge_accuracy(style, images=60)
    assert result.accepts_true_captions >= 0.95
    assert result.rejects_wrong_captions >= 0.95


def test_judge_rejects_a_swapped_relation():
    scene = _two_object_scene("above")
    image = shapes.render(scene)
    swapped = shapes.Scene(scene.objects, scene.background, "below", False).caption
    assert adherence.judge(image, scene.caption).ok
    assert not adherence.judge(image, swapped).ok


def test_a_blank_image_matches_nothing():
    blank = Image.new("RGB", (64, 64), shapes.BACKGROUNDS["black"])
    verdict = adherence.judge(blank, "a red circle on a black background")
    assert not verdict.ok and "found 0 objects" in verdict.reason


def test_judge_names_the_check_that_failed():
    scene = _two_object_scene("left of")
    image = shapes.render(scene)
    first, second = scene.objects
    other_background = next(b for b in shapes.BACKGROUNDS if b != scene.background)
    other_colour = next(c for c in shapes.COLOURS if c not in (first.colour, second.colour))
    captions = {
        "ok": scene.caption,
        "relation": shapes.Scene(scene.objects, scene.background, "right of", False).caption,
        "background": shapes.Scene(scene.objects, other_background, "left of", False).caption,
        "attributes": shapes.Scene((first, replace(second, colour=other_colour)), scene.background, "left of", False).caption,
        "count": shapes.Scene((first,), scene.background, None, False).caption,
    }
    assert {kind: adherence.judge(image, caption).kind for kind, caption in captions.items()} == {k: k for k in captions}


def test_failure_counts_and_relation_accuracy_separate_placing_from_drawing():
    scene = _two_object_scene("above")
    image = shapes.render(scene)
    swapped = shapes.Scene(scene.objects, scene.background, "below", False).caption
    blank = Image.new("RGB", (64, 64), shapes.BACKGROUNDS[scene.background])
    counts = adherence.failure_counts([image, image, image, blank], [scene.caption, scene.caption, swapped, scene.caption])
    assert counts == {"ok": 2, "background": 0, "count": 1, "attributes": 0, "relation": 1}
    assert adherence.relation_accuracy(counts) == pytest.approx(2 / 3)
    assert adherence.relation_accuracy(dict(counts, ok=0, relation=0)) is None


def test_base_adherence_table_counts_every_two_object_image_once(tiny_base_dir):
    from pnpguide.embedded.base_report import base_adherence_table

    table = base_adherence_table(str(tiny_base_dir), None, "flat", prompts=3, steps=2, scales=[1.0, 7.5], split="train")
    header, _, *rows = table.splitlines()
    assert "relation right" in header and [row.split("|")[1].strip() for row in rows] == ["1.0", "7.5"]
    for row in rows:
        two_objects, failures = float(row.split("|")[3]), row.split("|")[5]
        assert round(two_objects * 3) + sum(int(n) for n in failures.split("/")) == 3


def test_the_judge_tells_a_bar_from_the_base_shapes_only_where_asked():
    """A bar reads as a square to the three-shape judge; with the bar in its vocabulary (named in the caption, or a model
    that learnt it) it is a bar, and verdicts on the base's own images do not change."""
    scene = next(s for s in (shapes.sample_concept_scene(i, 3) for i in range(100)) if len(s.objects) == 1)
    image = shapes.render(scene)
    as_square = scene.caption.replace(" bar ", " square ")
    assert adherence.judge(image, scene.caption).ok
    assert adherence.judge(image, as_square).ok and not adherence.judge(image, as_square, new_shapes=("bar",)).ok
    for index in range(50):
        base_scene = shapes.sample_scene(index, 3)
        base_image = shapes.render(base_scene)
        assert adherence.judge(base_image, base_scene.caption, new_shapes=("bar",)) == adherence.judge(base_image, base_scene.caption)


def test_judge_accuracy_on_bar_scenes():
    result = adherence.judge_accuracy("flat", images=60, concept="bar")
    assert result.accepts_true_captions >= 0.95 and result.rejects_wrong_captions >= 0.95
    assert all(" bar " in shapes.sample_concept_scene(i, 99, "heldout").caption for i in range(20))
    assert not any(o.shape == "bar" for i in range(500) for o in shapes.sample_scene(i, 0).objects)  # the base's data has none
