import pytest
import torch

from pnpguide.loading import check_model_dir
from pnpguide.guide import GuideModel
from pnpguide.loading import GUIDE_WEIGHTS, load_guide


@pytest.fixture
def guide_dir(unet, tmp_path):
    GuideModel.from_unet(unet, "tiny").save_pretrained(tmp_path / "guide")
    return tmp_path / "guide"


def test_load_guide_round_trip(guide_dir):
    assert isinstance(load_guide(guide_dir), GuideModel)


def test_truncated_safetensors_is_a_clear_error(guide_dir):
    weights = guide_dir / GUIDE_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_guide(guide_dir)


def test_pickle_weights_are_refused_never_unpickled(guide_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Payload()}, guide_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="never unpickles"):
        load_guide(guide_dir)
    assert not marker.exists()


def test_missing_guide_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_guide(tmp_path / "nope")


def test_model_dir_missing_a_component_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    with pytest.raises(FileNotFoundError, match="lists component 'unet'.*no unet/ folder"):
        check_model_dir(tmp_path)


def test_shipped_guides_load_by_name_and_step_distilled_ones_say_their_step_counts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder called "tiny-8step" here
    assert tuple(load_guide("tiny-8step").config.trained_step_counts) == (8,)
    assert load_guide("tiny").config.trained_step_counts is None
    with pytest.raises(FileNotFoundError, match="shipped guides: .*tiny-16step"):
        load_guide("tiny-7step")
