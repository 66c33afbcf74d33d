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


# ---------------------------------------------------------------------------------------------------------------
# an explicit student grid (student_timesteps): one round, taught by CFG's own runs


def _output_guide_with_head(unet):
    from conftest import randomised

    from pnpguide import OutputGuide

    return randomised(OutputGuide.from_unet(unet).with_negative_head())


def _grid_config(tmp_path, base, guide, prompt_file, **overrides):
    settings = dict(output_dir=str(tmp_path / "grid"), base=str(base), guide=str(guide), teacher_steps=8, student_timesteps=[999, 874, 624, 374],
                    max_steps=2, batch_size=4, prompts=str(prompt_file), trajectories=6, lr_warmup_steps=0, checkpointing_steps=2)
    return StepDistillConfig(**(settings | overrides))


def test_a_grid_student_records_its_grid_and_interval_and_samples_through_the_pipeline(tiny_components, prompt_file, tmp_path):
    from pnpguide import PlugAndPlayPipeline

    pipe = StableDiffusionPipeline(**tiny_components)
    pipe.save_pretrained(tmp_path / "base")
    _output_guide_with_head(pipe.unet).save_pretrained(tmp_path / "guide")
    config = _grid_config(tmp_path, tmp_path / "base", tmp_path / "guide", prompt_file, unguided_below=500)
    saved = distill_steps(config)
    assert list(saved) == [4]
    guide = GuideModel.from_pretrained(saved[4])
    assert tuple(guide.config.trained_timesteps) == (999, 874, 624, 374)
    assert tuple(guide.config.default_guidance_interval) == (500.0, 1000.0)
    assert guide.config.negative_head and (saved[4] / "README.md").is_file()
    assert guide.config.trained_schedule["prediction_type"] == "v_prediction"

    plug = PlugAndPlayPipeline.from_pipe(pipe, guide=guide)  # no argument: the guide's own grid and interval
    plug.set_progress_bar_config(disable=True)
    calls = []
    plug.guide.register_forward_hook(lambda module, args, output: calls.append(int(args[1][0])))
    plug("a red circle", guidance_scale=5.0, output_type="latent")
    assert calls == [999, 874, 624]  # the default interval: guided at t >= 500 only
    calls.clear()
    plug("a red circle", guidance_scale=5.0, negative_prompt="blue", output_type="latent")
    assert calls == [999, 874, 624, 374]  # with a negative prompt, every step


def test_grid_segments_follow_the_teachers_runs_and_the_target_lands_on_the_segments_end(tiny_components, prompt_file, tmp_path):
    """Each segment starts where a CFG run (replayed here with diffusers' DDIMScheduler) is at the grid's timestep and
    ends where it is at the next one (the last: its final latents); one student DDIM step with the x0 target lands there."""
    from diffusers import DDIMScheduler

    from pnpguide.conditioning import encode_negative, encode_negatives, encode_prompts
    from pnpguide.distill_steps import _alpha_sigma, grid_segments, segment_target
    from pnpguide.negatives import NegativeSampler
    from pnpguide.sources import teacher_trajectories
    from pnpguide.teacher import cfg_noise_pred
    from pnpguide.training import make_accelerator

    pipe = StableDiffusionPipeline(**tiny_components)
    config = StepDistillConfig(output_dir=str(tmp_path / "runs"), prompts=str(prompt_file), trajectories=3, trajectory_steps=8, teacher_steps=8,
                               student_timesteps=[999, 624, 374], negative_rate=0.7)
    teacher = DDIMScheduler.from_config(pipe.scheduler.config)
    teacher.set_timesteps(8)
    prompts = ["a red circle on a black background", "a blue square above a green triangle on a white background"]
    pool = teacher_trajectories(pipe, prompts, tmp_path / "runs", config, make_accelerator(config), "states", None, NegativeSampler(0.7))
    grid = [999, 624, 374]
    segments = grid_segments(pool, teacher, grid, unguided_below=500)
    assert segments.starts.shape[:2] == (3, 3) and segments.negatives is not None
    with_negative = [i for i, n in enumerate(segments.negatives) if n]
    assert sorted(segments.pairs[segments.pairs[:, 0] == 2][:, 1].tolist()) == with_negative  # 374 < 500: runs with a negative only
    assert len(segments.pairs[segments.pairs[:, 0] == 0]) == 3
    repeated = grid_segments(pool, teacher, grid, unguided_below=500, repeats=[3, 0, 1])
    assert [int((repeated.pairs[:, 0] == i).sum()) for i in range(3)] == [9, 0, len(with_negative)]

    negative = encode_negatives(pipe, segments.negatives, encode_negative(pipe, "cpu", 16), "cpu", 16).prompt_embeds
    embeds = encode_prompts(pipe, segments.prompts, "cpu", 16).prompt_embeds
    x, states = segments.starts[0].clone(), {}
    with torch.no_grad():
        for t in teacher.timesteps.tolist():
            states[t] = x
            x = teacher.step(cfg_noise_pred(pipe.unet, x, t, embeds, negative, segments.w), t, x).prev_sample
    states[-1] = x
    acp, final = teacher.alphas_cumprod.float(), float(teacher.final_alpha_cumprod)
    for i, (t, t_next) in enumerate(zip(grid, grid[1:] + [-1])):
        torch.testing.assert_close(segments.starts[i], states[t], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(segments.ends[i], states[t_next], rtol=1e-4, atol=1e-4)
        batch = {"sample": segments.starts[i], "end": segments.ends[i], "t": torch.full((3,), t), "t_next": torch.full((3,), t_next)}
        x0 = segment_target(batch, {"alphas_cumprod": acp}, final)
        a, s = _alpha_sigma(acp, batch["t"], final)
        a_n, s_n = _alpha_sigma(acp, batch["t_next"], final)
        torch.testing.assert_close(ddim_step(x0, batch["sample"], a, s, a_n, s_n), segments.ends[i], rtol=1e-4, atol=1e-4)


def test_a_grid_student_of_a_latent_guide_trains_through_the_unet(tiny_pair, prompt_file, tmp_path):
    base, guide = tiny_pair
    saved = distill_steps(_grid_config(tmp_path, base, guide, prompt_file, student_timesteps=[999, 499]))
    assert tuple(GuideModel.from_pretrained(saved[2]).config.trained_timesteps) == (999, 499)


def test_a_student_timestep_off_the_teachers_grid_is_refused_before_the_teachers_runs(tiny_pair, prompt_file, tmp_path):
    base, guide = tiny_pair
    with pytest.raises(ValueError, match="teacher's DDIM grid at 8 steps"):
        distill_steps(_grid_config(tmp_path, base, guide, prompt_file, student_timesteps=[999, 937]))
    assert not (tmp_path / "grid" / "teacher-runs").exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(student_timesteps=[499, 999]), "strictly descending"),
    (dict(student_timesteps=[999, 499], unguided_below=1200), "unguided_below"),
    (dict(unguided_below=500), "go with --student-timesteps"),
    (dict(student_timesteps=[999, 499], segment_repeats=[1]), "segment_repeats"),
])
def test_grid_settings_are_checked_before_anything_loads(overrides, message):
    with pytest.raises(ValueError, match=message):
        StepDistillConfig(**overrides)


def test_a_negative_head_runs_on_the_rows_with_a_negative_only_and_gives_the_masked_output(unet):
    """The grid loss calls an output guide twice (rows with and without a negative): the same as one call whose head is masked."""
    from conftest import guide_inputs

    from pnpguide.conditioning import Conditioning
    from pnpguide.distill_steps import _output_student
    from pnpguide.teacher import output_guided

    guide = _output_guide_with_head(unet)
    sample, _, embeds = guide_inputs(batch=2)
    sample, embeds = torch.cat([sample, sample.flip(0)]), torch.cat([embeds, embeds.flip(0)])
    cond, t, w = torch.randn_like(sample), torch.tensor([999, 500, 250, 20]), torch.tensor([2.0, 7.5, 5.0, 3.0])
    negative, rows = torch.randn(4, 6, 32), torch.tensor([True, False, False, True])
    batch = {"sample": sample, "conditional": cond, "t": t, "w": w, "conditioning": Conditioning(embeds)}
    with torch.no_grad():
        split = _output_student(guide, batch, Conditioning(negative), rows)
        masked = output_guided(guide, cond, sample, t, embeds, w, negative, rows)
        without = output_guided(guide, cond, sample, t, embeds, w, None)
    torch.testing.assert_close(split, masked, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(split[rows], without[rows])
    torch.testing.assert_close(split[~rows], without[~rows], rtol=1e-5, atol=1e-6)
