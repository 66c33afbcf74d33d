"""Devices, dtypes and GPU readiness: the guide follows the pipeline, mismatches are one line, shipped names load,
attention heads suit fused kernels, and a UNet + guide step compiles as one graph."""

import json

import pytest
import torch
import torch._dynamo
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from conftest import tiny_unet
from pnpguide.cli import main
from pnpguide.evaluation.evaluate import EvalConfig
from pnpguide.devices import resolve_device, resolve_dtype
from pnpguide.evaluation.speed import SD15, SDXL
from pnpguide.guide import GuideModel, OutputGuide, ResidualGuide
from pnpguide.loading import shipped_guide_dirs
from pnpguide.pipeline import PlugAndPlayPipeline
from pnpguide.teacher import guided_noise_pred


def _pipe(tiny_components, dtype=torch.float32):
    return StableDiffusionPipeline(**tiny_components).to(dtype=dtype)


def test_from_pipe_keeps_the_dtype_and_casts_the_guide_to_it(tiny_components):
    sd = _pipe(tiny_components, torch.bfloat16)
    guide = OutputGuide.from_unet(sd.unet)
    assert guide.dtype == torch.float32
    pipe = PlugAndPlayPipeline.from_pipe(sd, guide=guide)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.guide.dtype == torch.bfloat16  # diffusers alone: float32
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="latent").images
    assert image.dtype == torch.bfloat16


def test_pipe_to_moves_the_guide_with_the_unet(tiny_components):
    pipe = PlugAndPlayPipeline(**tiny_components, guide=OutputGuide.from_unet(tiny_components["unet"]))
    pipe.to(torch.bfloat16)
    assert pipe.guide.dtype == torch.bfloat16


def test_a_guide_moved_apart_from_the_unet_is_one_line_naming_both_dtypes(tiny_components):
    pipe = PlugAndPlayPipeline(**tiny_components, guide=OutputGuide.from_unet(tiny_components["unet"]))
    pipe.unet.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"the guide is torch.float32 but the UNet is torch.bfloat16: move both with pipe.to"):
        pipe("a red circle", num_inference_steps=1, output_type="latent")
    pipe.to(torch.bfloat16)  # what the message says to do
    assert pipe("a red circle", num_inference_steps=1, output_type="latent").images.dtype == torch.bfloat16


def test_devices_and_dtypes_resolve_or_fail_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.warns(UserWarning, match="bfloat16 is the fast half precision"):
        assert resolve_dtype("float16", "cpu") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.parametrize("name, design", [("default", OutputGuide), ("4-step", OutputGuide), ("8-step", OutputGuide), ("paper", ResidualGuide)])
def test_guide_from_pretrained_takes_the_shipped_names(name, design):
    assert name in [p.name for p in shipped_guide_dirs()]
    assert type(GuideModel.from_pretrained(name)) is design


def test_an_unknown_guide_name_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="no guide folder or shipped guide named 'defualt'.*4-step, 8-step, default, paper"):
        GuideModel.from_pretrained("defualt")


@pytest.mark.parametrize("config", [SD15, SDXL], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("design", [OutputGuide, ResidualGuide])
def test_guide_attention_heads_are_multiples_of_8_wide(config, design):
    with torch.device("meta"):
        guide = design.from_unet(UNet2DConditionModel(**config))
    attentions = [m for m in guide.modules() if isinstance(m, Attention)]
    assert attentions
    assert all(m.inner_dim // m.heads % 8 == 0 for m in attentions), [m.inner_dim // m.heads for m in attentions]


def _randomised(guide):
    torch.manual_seed(2)
    for p in guide.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return guide.eval()


@pytest.mark.parametrize("design", [OutputGuide, ResidualGuide])
def test_a_guided_step_compiles_as_one_graph(design):
    """fullgraph=True fails on any graph break; the "eager" backend proves that without a C++ toolchain (inductor
    compiles the same graph, but takes minutes on this CPU)."""
    unet = tiny_unet().eval()
    guide = _randomised(design.from_unet(unet))

    def step(sample, timestep, embeds):
        return guided_noise_pred(unet, guide, sample, timestep, embeds, 5.0)

    torch.manual_seed(0)
    sample, timestep, embeds = torch.randn(2, 4, 8, 8), torch.tensor(500), torch.randn(2, 6, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(step, fullgraph=True, backend="eager")(sample, timestep, embeds)
        eager = step(sample, timestep, embeds)
    assert not torch.equal(eager, unet(sample, timestep, embeds).sample)  # the guide does act
    torch.testing.assert_close(compiled, eager)


def test_eval_samples_in_bfloat16_and_records_it(tiny_base_dir, tiny_components, tmp_path, capsys):
    OutputGuide.from_unet(tiny_components["unet"]).save_pretrained(tmp_path / "guide")
    out = tmp_path / "eval"
    code = main(["--threads", "1", "eval", "--base", str(tiny_base_dir), "--guide", str(tmp_path / "guide"), "--methods", "cfg", "guide",
                 "--steps", "2", "--scales", "3", "--images", "2", "--no-speed", "--fid-features", "none", "--device", "cpu",
                 "--dtype", "bfloat16", "--out-dir", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    environment = json.loads((out / "report.json").read_text())["environment"]
    assert (environment["device"], environment["dtype"]) == ("cpu", "bfloat16")


@pytest.mark.parametrize("overrides, message", [(dict(dtype="fp8"), "unknown dtype 'fp8'"), (dict(device="tpu"), "unknown device 'tpu'")])
def test_bad_eval_device_or_dtype_fail_in_the_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**overrides)


@pytest.mark.parametrize("mode", ["guide", "cfg", "none"])
def test_the_loop_gives_schedulers_python_timesteps_and_the_unet_device_tensors(tiny_components, mode):
    """What keeps a GPU loop free of host round trips: a scheduler branching on a device tensor, or the UNet turning a
    Python number into a tensor, would each wait for the device at every step."""
    pipe = PlugAndPlayPipeline(**tiny_components, guide=OutputGuide.from_unet(tiny_components["unet"]))
    pipe.set_progress_bar_config(disable=True)
    seen = {"scheduler": [], "unet": []}
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda output, t, *args, **kwargs: seen["scheduler"].append(t) or step(output, t, *args, **kwargs)
    pipe.unet.register_forward_pre_hook(lambda module, args: seen["unet"].append(args[1]))
    pipe("a red circle", num_inference_steps=3, output_type="latent", mode=mode, guidance_scale=1.0 if mode == "none" else 5.0)
    assert len(seen["scheduler"]) == 3 and all(isinstance(t, (int, float)) for t in seen["scheduler"])
    assert seen["unet"] and all(isinstance(t, torch.Tensor) for t in seen["unet"])


def test_from_pipe_keeps_an_fp32_vae_beside_a_half_precision_unet(tiny_components):
    sd = _pipe(tiny_components, torch.bfloat16)
    sd.vae.to(torch.float32)  # as SDXL users keep the VAE, whose fp16 decode overflows
    pipe = PlugAndPlayPipeline.from_pipe(sd, guide=OutputGuide.from_unet(sd.unet))
    assert (pipe.vae.dtype, pipe.unet.dtype, pipe.guide.dtype) == (torch.float32, torch.bfloat16, torch.bfloat16)
    assert sd.vae.dtype == torch.float32  # the original pipeline's (shared) VAE too


@pytest.mark.parametrize("design", [OutputGuide, ResidualGuide])
def test_a_pipeline_with_compiled_unet_and_guide_samples_the_same_latents(tiny_components, design):
    """Module-level compile, as a user would write it."""
    guide = _randomised(design.from_unet(tiny_components["unet"]))
    pipe = PlugAndPlayPipeline(**tiny_components, guide=guide)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a red circle", num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(0)).images

    eager = run()
    torch._dynamo.reset()
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="eager")
    pipe.guide = torch.compile(pipe.guide, fullgraph=True, backend="eager")
    torch.testing.assert_close(run(), eager)


def test_eval_checks_its_dtype_on_its_own_device_not_the_cpu():
    """The dtype is checked (and warned about) for the device the eval runs on: float16 on a GPU is not slow CPU half precision."""
    import warnings

    from pnpguide.evaluation.evaluate import build_methods

    config = EvalConfig(methods=["guide"], guide=[str(shipped_guide_dirs()[0])], dtype="bfloat16")
    config.dtype, config.device = "float16", "meta"  # a device other than the CPU that needs no GPU here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (method,) = build_methods(config)
    assert (method.guide.device.type, method.guide.dtype) == ("meta", torch.float16)
    assert not [w for w in caught if "on the CPU" in str(w.message)]
