"""Bad and hostile inputs at every boundary end in one clear error, never in a traceback from deep inside
diffusers or in code execution. Complements test_loading.py, test_guide.py and test_distill_guidance.py, which
cover the first cases of each kind (truncated weights, a `.bin` pickle, a missing component folder, an empty prompt
file)."""

import pickle
import shutil

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import save_file

from conftest import tiny_unet
from pnpguide.sources import read_prompt_file
from pnpguide.loading import load_pipeline
from pnpguide.embedded.base import prediction_target
from pnpguide.guide import OutputGuide, ResidualGuide
from pnpguide.loading import GUIDE_WEIGHTS, load_guide, load_plug_and_play
from pnpguide.pipeline import PlugAndPlayPipeline

OTHER_UNETS = [
    (dict(in_channels=8), "guide built for in_channels=8, this UNet has 4"),
    (dict(block_out_channels=(16, 48)), r"guide built for block_out_channels=\(16, 48\), this UNet has \(16, 32\)"),
    (dict(layers_per_block=2), "guide built for layers_per_block=2, this UNet has 1"),
]


@pytest.fixture(params=[OutputGuide, ResidualGuide], ids=["output", "residual"])
def guide_dir(tiny_components, tmp_path, request):
    request.param.from_unet(tiny_components["unet"]).save_pretrained(tmp_path / "guide")
    return tmp_path / "guide"


# ---------------------------------------------------------------------------------------------------------------
# a guide built for another UNet


@pytest.mark.parametrize("design", [OutputGuide, ResidualGuide])
@pytest.mark.parametrize("unet_change, match", OTHER_UNETS)
def test_a_pipeline_refuses_a_guide_built_for_another_unet(tiny_components, unet_change, match, design):
    foreign = design.from_unet(tiny_unet(**unet_change))
    with pytest.raises(ValueError, match=match):
        PlugAndPlayPipeline(**tiny_components, guide=foreign)


def test_loading_a_base_with_another_unets_guide_names_the_mismatch(tiny_base_dir, tmp_path):
    OutputGuide.from_unet(tiny_unet(cross_attention_dim=48)).save_pretrained(tmp_path / "foreign")
    with pytest.raises(ValueError, match="guide built for cross_attention_dim=48, this UNet has 32; retrain or pick"):
        load_plug_and_play(tiny_base_dir, tmp_path / "foreign")


# ---------------------------------------------------------------------------------------------------------------
# guide weights that are corrupt, pickled, or not a guide's


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"\xff\xff\xff\xff\xff\xff\xff\x7f{}", pickle.dumps({"weight": [1.0]})])
def test_garbage_or_a_pickle_under_the_safetensors_name_is_a_clear_error(guide_dir, content):
    (guide_dir / GUIDE_WEIGHTS).write_bytes(content)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_guide(guide_dir)


@pytest.mark.parametrize("name", ["model.ckpt", "weights.pt", "weights.pth", "extra.pkl"])
def test_every_pickle_suffix_is_refused(guide_dir, name):
    (guide_dir / name).write_bytes(pickle.dumps({"weight": [1.0]}))
    with pytest.raises(ValueError, match="never unpickles"):
        load_guide(guide_dir)


def test_a_guide_folder_without_weights_is_a_clear_error(guide_dir):
    (guide_dir / GUIDE_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="is not a guide folder: it needs config.json and"):
        load_guide(guide_dir)


@pytest.mark.parametrize("design, other, match", [
    (ResidualGuide, lambda: ResidualGuide.from_unet(tiny_unet(block_out_channels=(16, 48))), r"down_projections\.\d+\.\w+ expected shape"),
    (OutputGuide, lambda: OutputGuide.from_unet(tiny_unet(), width=16), r"output_head\.[\w.]+ expected shape"),
], ids=["residual", "output"])
def test_weights_of_another_guide_name_the_tensor_that_does_not_fit(tiny_components, tmp_path, design, other, match):
    design.from_unet(tiny_components["unet"]).save_pretrained(tmp_path / "guide")
    save_file(other().state_dict(), str(tmp_path / "guide" / GUIDE_WEIGHTS))  # valid safetensors, wrong shapes
    with pytest.raises(ValueError, match=match):
        load_guide(tmp_path / "guide")


def test_a_corrupt_guide_config_is_a_clear_error(guide_dir):
    (guide_dir / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="is not a valid JSON file"):
        load_guide(guide_dir)


# ---------------------------------------------------------------------------------------------------------------
# base folders with a missing or broken component


def test_a_missing_component_folder_is_named_before_loading(tiny_base_dir):
    shutil.rmtree(tiny_base_dir / "vae")
    with pytest.raises(FileNotFoundError, match="lists component 'vae' in model_index.json but has no vae/ folder"):
        load_pipeline(tiny_base_dir)


def test_a_component_folder_without_weights_is_a_clear_error(tiny_base_dir):
    (tiny_base_dir / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(RuntimeError, match=f"could not load the pipeline in {tiny_base_dir}"):
        load_pipeline(tiny_base_dir)


# ---------------------------------------------------------------------------------------------------------------
# prompt files


def test_a_non_utf8_prompt_file_names_the_byte(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a red circle\n".encode() + "un cercle élevé\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"is not UTF-8 text \(invalid continuation byte at byte 23\); re-save it as UTF-8"):
        read_prompt_file(path)


def test_a_jsonl_prompt_file_of_blank_lines_has_no_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n   \n\n")
    with pytest.raises(ValueError, match="has no prompts; write one prompt per line"):
        read_prompt_file(path)


@pytest.mark.parametrize("line", ['{"image": "x.png"}', "[1, 2]", "not json"])
def test_a_bad_jsonl_record_names_its_line(tmp_path, line):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a red circle"}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: expected a JSON object with a 'prompt', 'text' or 'caption'"):
        read_prompt_file(path)


def test_a_missing_prompt_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file .* does not exist"):
        read_prompt_file(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------------------------------------------
# sampling arguments


@pytest.fixture
def pipe(tiny_components):
    pipe = PlugAndPlayPipeline(**tiny_components, guide=OutputGuide.from_unet(tiny_components["unet"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("bad, match", [
    (dict(num_inference_steps=-1), "num_inference_steps must be >= 1"),
    (dict(height=20), "`height` and `width` have to be divisible by 8 but are 20 and 16"),
])
def test_bad_sampling_arguments_fail_before_any_model_call(pipe, bad, match):
    calls = []
    pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=match):
        pipe(**({"prompt": "a red circle", "num_inference_steps": 2, "output_type": "np"} | bad))
    assert not calls


def test_an_unknown_prediction_type_is_a_clear_error():
    scheduler = DDIMScheduler(prediction_type="sample")
    latents = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="unsupported prediction_type 'sample'; use epsilon or v_prediction"):
        prediction_target(scheduler, latents, torch.randn_like(latents), torch.tensor([10]))
