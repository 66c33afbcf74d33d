"""An output guide's step heads: prompt heads of their own for some timesteps, added to a trained guide as copies of
its shared head and trained alone, each on the teacher states at its timestep."""

import pytest
import torch

from conftest import distill_flags, guide_inputs, randomised
from pnpguide.distill_guidance import GuidanceDistillConfig
from pnpguide.guide import GuideModel, OutputGuide
from pnpguide.shards import ShardPool


def _output(guide, sample, t, embeds, unet_output):
    with torch.no_grad():
        return guide(sample, t, embeds, 5.0, unet_output=unet_output).sample


def test_new_step_heads_change_nothing_and_each_then_serves_its_own_timestep(unet):
    guide = randomised(OutputGuide.from_unet(unet))
    headed = guide.with_step_heads([700])
    sample, t, embeds = guide_inputs()  # rows at t = 10 and t = 700
    unet_output = torch.randn_like(sample)
    before = _output(guide, sample, t, embeds, unet_output)
    torch.testing.assert_close(_output(headed, sample, t, embeds, unet_output), before, rtol=0, atol=1e-5)
    torch.nn.init.normal_(headed.step_output_heads[0].conv_out.weight, std=0.05)
    after = _output(headed, sample, t, embeds, unet_output)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=1e-5)  # t = 10: the shared head
    assert (after[1] - before[1]).abs().max() > 1e-3  # t = 700: its own
    torch.testing.assert_close(_output(headed, sample[1:], 700, embeds[1:], unet_output[1:]), after[1:], rtol=0, atol=1e-5)
    assert headed.with_step_heads([700]) is headed
    with pytest.raises(ValueError, match="already has step heads for t = \\[700\\]"):
        headed.with_step_heads([10])


def test_step_heads_save_and_load(unet, tmp_path):
    guide = randomised(OutputGuide.from_unet(unet)).with_step_heads([10, 700])
    torch.nn.init.normal_(guide.step_output_heads[1].conv_out.weight, std=0.05)
    guide.save_pretrained(tmp_path / "guide", safe_serialization=True)
    loaded = GuideModel.from_pretrained(tmp_path / "guide")
    assert list(loaded.config.step_heads) == [700, 10]  # highest t first, as sampling meets them
    sample, t, embeds = guide_inputs()
    unet_output = torch.randn_like(sample)
    assert torch.equal(_output(loaded, sample, t, embeds, unet_output), _output(guide, sample, t, embeds, unet_output))


def test_distill_step_heads_trains_those_heads_alone_on_the_states_at_their_timesteps(tiny_base_dir, prompt_file, tmp_path):
    from pnpguide.cli import main

    assert main(distill_flags(tiny_base_dir, prompt_file, tmp_path / "a", max_steps=2)) == 0
    pool = ShardPool(tmp_path / "a" / "trajectories", prompt_file.read_text().splitlines())
    recorded = sorted({int(t) for t in pool.rows(torch.arange(len(pool))).timesteps.tolist()}, reverse=True)
    first, last = recorded[0], recorded[-1]
    at_first = pool.at_timesteps([first])
    assert len(at_first) == 8 and set(at_first.rows(torch.arange(8)).timesteps.tolist()) == {first}  # one state per run
    flags = distill_flags(tiny_base_dir, prompt_file, tmp_path / "b", init_guide=tmp_path / "a" / "guide", learning_rate=0.01)
    assert main(flags + ["--step-heads", "0", "3"]) == 0  # the first and the last of the 4 steps recorded
    before, after = GuideModel.from_pretrained(tmp_path / "a" / "guide"), GuideModel.from_pretrained(tmp_path / "b" / "guide")
    assert list(after.config.step_heads) == [first, last]
    assert after.config.trained_first_steps == before.config.trained_first_steps == 4
    assert after.correction_carry == before.correction_carry
    trained = after.state_dict()
    assert all(torch.equal(value, trained[name]) for name, value in before.state_dict().items())  # the rest did not move
    shared = after.output_head.state_dict()
    for head in after.step_output_heads:
        assert any(not torch.equal(value, shared[name]) for name, value in head.state_dict().items())  # each head trained


def test_a_step_head_at_a_step_the_teacher_does_not_record_fails_before_anything_runs(tiny_base_dir, prompt_file, tmp_path, capsys):
    from pnpguide.cli import main

    assert main(distill_flags(tiny_base_dir, prompt_file, tmp_path / "a", max_steps=1)) == 0
    flags = distill_flags(tiny_base_dir, prompt_file, tmp_path / "b", init_guide=tmp_path / "a" / "guide") + ["--step-heads", "0", "4"]
    assert main(flags) != 0
    assert "--step-heads [4]: the teacher runs record steps 0 to 3 (--trajectory-first-steps)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_step_heads_need_a_trained_output_guide_and_no_negative_head_in_the_same_run():
    with pytest.raises(ValueError, match="--step-heads gives a trained output guide heads of its own"):
        GuidanceDistillConfig(step_heads=[0])
    with pytest.raises(ValueError, match="--step-heads and --negative-head train different heads"):
        GuidanceDistillConfig(step_heads=[0], init_guide="default", negative_head=True)
    assert GuidanceDistillConfig(step_heads=[0, 4], init_guide="default").trajectory_first_steps == 5
