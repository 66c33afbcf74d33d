import pytest
import torch

from pnpguide.loading import check_model_dir
from pnpguide.guide import GuideModel, OutputGuide, ResidualGuide
from pnpguide.loading import GUIDE_WEIGHTS, load_guide


@pytest.fixture
def guide_dir(unet, tmp_path):
    OutputGuide.from_unet(unet).save_pretrained(tmp_path / "guide")
    return tmp_path / "guide"


def test_load_guide_round_trip(guide_dir):
    assert isinstance(load_guide(guide_dir), OutputGuide)


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
    from pnpguide.loading import default_guide_dir

    monkeypatch.chdir(tmp_path)  # no folder called "8-step" here
    assert len(load_guide("8-step").config.trained_timesteps) == 8 and load_guide("8-step").policy.num_inference_steps == 8
    default = load_guide("default")
    assert isinstance(default, OutputGuide) and default.config.trained_timesteps is None and default.correction_carry is not None
    assert default_guide_dir().name == "default" and load_guide(default_guide_dir()).correction_carry == default.correction_carry
    assert isinstance(load_guide("paper"), ResidualGuide) and isinstance(GuideModel.from_pretrained("paper"), ResidualGuide)
    with pytest.raises(FileNotFoundError, match="shipped guides: 4-step, 8-step, default, paper"):
        load_guide("7-step")
