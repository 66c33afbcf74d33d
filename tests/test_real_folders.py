"""SD 1.5- and SDXL-layout folders through the loader and the commands: the pipeline class comes from the folder."""

import json
import shutil

import pytest
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from pnpguide.loading import check_model_dir, load_pipeline, pipeline_class


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


def _edit_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_the_loader_picks_the_pipeline_class_from_model_index(sd15_dir, sdxl_dir):
    assert type(load_pipeline(sd15_dir)) is StableDiffusionPipeline
    sdxl = load_pipeline(sdxl_dir)
    assert type(sdxl) is StableDiffusionXLPipeline and sdxl.text_encoder_2 is not None and sdxl.tokenizer_2 is not None


@pytest.mark.parametrize("name", ["DiffusionPipeline", "MyFineTunedXLPipeline"])
def test_an_unknown_class_name_falls_back_on_the_components(sdxl_dir, tmp_path, name):
    folder = _copy(sdxl_dir, tmp_path)
    _edit_json(folder / "model_index.json", _class_name=name)
    assert pipeline_class(folder) is StableDiffusionXLPipeline


def test_an_unsupported_pipeline_is_one_line_naming_the_supported_ones(tmp_path):
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": [None, None]}))
    with pytest.raises(ValueError, match="FluxPipeline.*supports StableDiffusionPipeline.*StableDiffusionXLPipeline") as error:
        check_model_dir(tmp_path / "flux")
    assert "\n" not in str(error.value)


def test_an_sdxl_folder_without_its_second_encoder_is_refused_before_loading(sdxl_dir, tmp_path):
    folder = _copy(sdxl_dir, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    del index["text_encoder_2"], index["tokenizer_2"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline folder but model_index.json does not list text_encoder_2, tokenizer_2"):
        load_pipeline(folder)
    _edit_json(folder / "model_index.json", _class_name="StableDiffusionPipeline")  # its UNet still wants SDXL's conditioning
    with pytest.raises(ValueError, match="needs SDXL's second text encoder: add text_encoder_2 and tokenizer_2"):
        load_pipeline(folder)


def test_an_sdxl_folder_missing_the_tokenizer_2_folder_is_named(sdxl_dir, tmp_path):
    folder = _copy(sdxl_dir, tmp_path)
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match="tokenizer_2"):
        check_model_dir(folder)
