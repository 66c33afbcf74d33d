import pytest
import torch
from diffusers import StableDiffusionPipeline

from pnpguide.distill_steps import StepDistillConfig, ddim_step, distill_steps, next_timestep, predicted_x0, step_schedule
from conftest import randomised
from pnpguide.guide import GuideModel, OutputGuide, ResidualGuide


@pytest.fixture
def tiny_pair(tiny_components, tmp_path):
    pipe = StableDiffusionPipeline(**tiny_components)
    pipe.save_pretrained(tmp_path / "base")
    OutputGuide.from_unet(pipe.unet).save_pretrained(tmp_path / "guide")
    return tmp_path / "base", tmp_path / "guide"


def test_ddim_step_with_the_true_x0_and_noise_is_exact():
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a, s, a2, s2 = torch.tensor(0.6), torch.tensor(0.8), torch.tensor(0.8), torch.tensor(0.6)
    z = a * x0 + s * eps
    torch.testing.assert_close(ddim_step(x0, z, a, s, a2, s2), a2 * x0 + s2 * eps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_inverts_both_parametrisations(prediction_type):
    x0, eps = torch.randn(2, 4), torch.randn(2, 4)
    a, s = torch.tensor(0.6), torch.tensor(0.8)
    output = eps if prediction_type == "epsilon" else a * eps - s * x0
    torch.testing.assert_close(predicted_x0(output, a * x0 + s * eps, a, s, prediction_type), x0)


def test_next_timestep_follows_ddim_and_ends_at_minus_one(tiny_components):
    grid = step_schedule(tiny_components["scheduler"].config, 4)
    assert grid[0] == 999
    assert next_timestep(grid, 1000, 4).tolist()[-1] == -1


def test_each_round_halves_the_steps_and_records_them(tiny_pair, prompt_file, tmp_path):
    base, guide = tiny_pair
    config = StepDistillConfig(
        output_dir=str(tmp_path / "steps"), base=str(base), guide=str(guide), teacher_steps=8, student_steps=2,
        max_steps=3, batch_size=4, prompts=str(prompt_file), trajectories=4, trajectory_steps=2, lr_warmup_steps=0,
    )
    saved = distill_steps(config)
    assert sorted(saved) == [2, 4]
    student = GuideModel.from_pretrained(saved[2])
    assert tuple(student.config.trained_timesteps) == tuple(int(t) for t in step_schedule(student.config.trained_schedule, 2))
    assert len(student.config.trained_timesteps) == 2 and student.correction_carry is None
    assert (saved[2] / "README.md").is_file()


def test_student_steps_must_be_a_halving_of_teacher_steps():
    with pytest.raises(ValueError, match="halved one or more times"):
        StepDistillConfig(teacher_steps=32, student_steps=12)


@pytest.mark.parametrize("design", [None, OutputGuide, ResidualGuide])
def test_teacher_target_lands_where_two_ddim_steps_of_the_teacher_land(tiny_components, design):
    """The x0 target, put through one student DDIM step, must reproduce two teacher steps of diffusers' DDIMScheduler."""
    from diffusers import DDIMScheduler

    from pnpguide.conditioning import Conditioning
    from pnpguide.distill_steps import Denoiser, _alpha_sigma, teacher_target
    from pnpguide.teacher import cfg_noise_pred, guided_noise_pred

    unet = tiny_components["unet"]
    scheduler = DDIMScheduler.from_config(tiny_components["scheduler"].config)
    teacher = None if design is None else randomised(design.from_unet(unet))  # None: true CFG
    embeds, negative = torch.randn(2, 16, 32), torch.randn(1, 16, 32)
    w = torch.tensor([3.0, 6.0])
    steps, acp = 4, scheduler.alphas_cumprod.float()
    t = step_schedule(scheduler.config, steps)[1].repeat(2)
    batch = {"sample": torch.randn(2, 4, 8, 8), "t": t, "t_mid": next_timestep(t, 1000, 2 * steps), "t_next": next_timestep(t, 1000, steps),
             "conditioning": Conditioning(embeds), "w": w}
    final = float(scheduler.final_alpha_cumprod)
    with torch.no_grad():
        x0 = teacher_target(Denoiser(unet, dict(scheduler.config), Conditioning(negative)), teacher, batch, {"alphas_cumprod": acp}, final)
        a_t, s_t = _alpha_sigma(acp, t, final)
        a_n, s_n = _alpha_sigma(acp, batch["t_next"], final)
        student_lands = ddim_step(x0, batch["sample"], a_t, s_t, a_n, s_n)

        scheduler.set_timesteps(2 * steps)
        z = batch["sample"]
        for step_t in (int(t[0]), int(batch["t_mid"][0])):
            if teacher is None:
                out = cfg_noise_pred(unet, z, step_t, embeds, negative.expand_as(embeds), w)
            else:
                out = guided_noise_pred(unet, teacher, z, step_t, embeds, w)
            z = scheduler.step(out, step_t, z).prev_sample
    torch.testing.assert_close(student_lands, z, atol=1e-4, rtol=1e-4)


def test_only_the_main_rank_writes_the_students(tiny_pair, prompt_file, tmp_path, monkeypatch):
    """Under data parallelism every rank holds the same student: the others must not write the same files concurrently."""
    from pnpguide import distill_steps as module
    from pnpguide.shards import TensorPool
    from pnpguide.training import make_accelerator

    class OtherRank:  # rank 1 of a run: the real accelerator, except that it is not the main process
        def __init__(self, accelerator):
            self.accelerator, self.is_main_process, self.waits = accelerator, False, 0

        def __getattr__(self, name):
            return getattr(self.accelerator, name)

        def wait_for_everyone(self):
            self.waits += 1

    ranks = []
    monkeypatch.setattr(module, "make_accelerator", lambda config: ranks.append(OtherRank(make_accelerator(config))) or ranks[-1])
    pool = TensorPool(torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 0, 1]), ["a red cat", "red"])
    monkeypatch.setattr(module, "training_pools", lambda *args, **kwargs: [pool])
    base, guide = tiny_pair
    config = StepDistillConfig(output_dir=str(tmp_path / "steps"), base=str(base), guide=str(guide), teacher_steps=4, student_steps=2,
                               max_steps=1, batch_size=2, prompts=str(prompt_file), lr_warmup_steps=0)
    saved = distill_steps(config)
    assert sorted(saved) == [2] and not saved[2].exists() and ranks[0].waits >= 1
