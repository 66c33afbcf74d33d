"""`--mixed-precision bf16` on the CPU: accelerate's autocast wrapper rebuilds the guide's output from a mapping when
it casts it back to fp32, and the guide trains and saves in fp32."""

import pytest
import torch

from conftest import distill_flags
from pnpguide.cli import main
from pnpguide.guide import GuideModel, GuideOutput, OutputGuide


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses another mixed precision in it: other tests of
    this process train with "no", these with "bf16", so the state is cleared on both sides (not the process group)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_a_guide_output_can_be_rebuilt_from_a_mapping_as_accelerate_does():
    output = GuideOutput((torch.ones(1), torch.zeros(1)), torch.full((1,), 2.0))
    rebuilt = type(output)({key: value for key, value in output.items()})  # accelerate's recursively_apply
    assert rebuilt.mid_block_additional_residual.item() == 2.0
    assert len(rebuilt.down_block_additional_residuals) == 2


@pytest.mark.parametrize("design", ["residual", "output"])
def test_distill_with_bf16_mixed_precision_trains_an_fp32_guide(tiny_base_dir, prompt_file, tmp_path, design):
    out = tmp_path / "run"
    assert main(distill_flags(tiny_base_dir, prompt_file, out, mixed_precision="bf16", design=design)) == 0
    guide = GuideModel.from_pretrained(str(out / "guide"))
    assert guide.dtype == torch.float32
    projections = {"residual": lambda: guide.down_projections[0], "output": lambda: guide.output_head.conv_out}[design]()
    assert projections.weight.abs().sum() > 0  # moved away from the zero init
    assert all(torch.isfinite(p).all() for p in guide.parameters())


def test_distill_steps_with_bf16_mixed_precision_runs(tiny_components, prompt_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    from pnpguide.distill_steps import StepDistillConfig, distill_steps

    pipe = StableDiffusionPipeline(**tiny_components)
    pipe.save_pretrained(tmp_path / "base")
    OutputGuide.from_unet(pipe.unet).save_pretrained(tmp_path / "guide")
    config = StepDistillConfig(
        output_dir=str(tmp_path / "steps"), base=str(tmp_path / "base"), guide=str(tmp_path / "guide"), teacher_steps=4,
        student_steps=2, max_steps=2, batch_size=4, prompts=str(prompt_file), trajectories=4, trajectory_steps=2,
        lr_warmup_steps=0, mixed_precision="bf16",
    )
    student = GuideModel.from_pretrained(distill_steps(config)[2])
    assert student.dtype == torch.float32 and all(torch.isfinite(p).all() for p in student.parameters())
