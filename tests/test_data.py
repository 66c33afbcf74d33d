import pytest
import torch

from pnpguide.embedded import shapes


def test_scenes_are_deterministic_for_a_seed_and_index():
    assert shapes.sample_scene(3, seed=1) == shapes.sample_scene(3, seed=1)
    assert shapes.sample_scene(3, seed=1) != shapes.sample_scene(3, seed=2)


def test_training_scenes_never_use_a_held_out_combination():
    train = {shapes.sample_scene(i, 0, "train").combination for i in range(2000)}
    heldout = {shapes.sample_scene(i, 0, "heldout").combination for i in range(300)}
    assert heldout and not train & heldout
    assert all(shapes.is_held_out(c) for c in heldout)


def test_dataset_covers_the_vocabulary():
    scenes = [shapes.sample_scene(i, 0) for i in range(3000)]
    assert {o.shape for s in scenes for o in s.objects} == set(shapes.SHAPES)
    assert {o.colour for s in scenes for o in s.objects} == set(shapes.COLOURS)
    assert {s.background for s in scenes} == set(shapes.BACKGROUNDS)
    assert {s.relation for s in scenes} == {None, *shapes.RELATIONS}


def test_captions_follow_the_templates():
    scene = shapes.Scene(
        (shapes.ShapeObject("circle", "red", (20, 16), 14, "small"), shapes.ShapeObject("square", "orange", (20, 48), 14, "small")),
        "black",
        "above",
        mention_size=False,
    )
    assert scene.caption == "a red circle above an orange square on a black background"


def test_two_objects_never_touch():
    for i in range(500):
        scene = shapes.sample_scene(i, 0)
        if len(scene.objects) == 2:
            a, b = scene.objects
            gap = max(abs(a.center[0] - b.center[0]), abs(a.center[1] - b.center[1])) - (a.extent + b.extent) / 2
            assert gap >= 5.9


@pytest.mark.parametrize("style", shapes.STYLES)
def test_dataset_items_are_images_in_minus_one_to_one(style):
    item = shapes.ShapesDataset(4, style=style)[2]
    assert item["pixel_values"].shape == (3, 64, 64)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert isinstance(item["caption"], str)


def test_styles_render_the_same_scene_differently():
    scene = shapes.sample_scene(0)
    flat, outline = (shapes.image_to_tensor(shapes.render(scene, s)) for s in ("flat", "outline"))
    assert not torch.equal(flat, outline)


def test_unknown_style_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown style 'sepia'"):
        shapes.ShapesDataset(4, style="sepia")


def test_heldout_captions_are_distinct_while_possible_then_repeat():
    captions = shapes.heldout_captions(20, objects=2)
    assert len(set(captions)) == 20
    assert all(" of " in c or " above " in c or " below " in c for c in captions)
    singles = shapes.heldout_captions(40, objects=1)
    assert len(singles) == 40 and singles[:18] == singles[18:36] and len(set(singles)) == 18


def test_split_captions_come_from_their_split():
    from pnpguide.embedded.adherence import parse_caption

    def held_out(caption):
        spec = parse_caption(caption)
        first, second = (f"{o.colour} {o.shape}" for o in spec.objects)
        return shapes.is_held_out(f"{first}|{spec.relation}|{second}|{spec.background}")

    train = shapes.split_captions(30, "train", objects=2)
    assert len(set(train)) == 30 and not any(held_out(c) for c in train)
    assert all(held_out(c) for c in shapes.heldout_captions(30, objects=2))
    assert shapes.split_captions(30, "heldout", objects=2) == shapes.heldout_captions(30, objects=2)
    assert not set(train) & set(shapes.heldout_captions(200, objects=2))
    with pytest.raises(ValueError, match="split"):
        shapes.split_captions(3, "test")


def test_teacher_run_captions_keep_each_kind_of_scene_at_its_share():
    """Teacher runs draw uniformly from this list: deduplicated, one-object scenes (half of them, few distinct captions)
    would be a few percent of the runs, and the guide fitted them worst."""
    from pnpguide.embedded.adherence import parse_caption
    from pnpguide.embedded.source import ShapesData

    captions = ShapesData().captions(2000, seed=11)
    assert len(captions) == 2000 and len(set(captions)) < 2000
    one_object = sum(len(parse_caption(c).objects) == 1 for c in captions) / len(captions)
    assert 0.4 < one_object < 0.6
