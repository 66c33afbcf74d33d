import pytest

from pnpguide.schedules import guidance_schedule, linear_schedule, parse_w_schedule

TIMESTEPS = [999, 749, 499, 249]


def test_a_constant_is_repeated_for_every_step():
    assert guidance_schedule(5.0, TIMESTEPS) == [5.0] * 4


def test_the_interval_is_inclusive_and_sets_w_1_outside():
    assert guidance_schedule(5.0, TIMESTEPS, (249, 749)) == [1.0, 5.0, 5.0, 5.0]
    assert guidance_schedule([2.0, 3.0, 4.0, 5.0], TIMESTEPS, (500, 1000)) == [2.0, 3.0, 1.0, 1.0]


def test_a_callable_is_called_once_per_step_with_index_and_timestep():
    calls = []
    assert guidance_schedule(lambda i, t: calls.append((i, t)) or 1.0 + i, TIMESTEPS) == [1.0, 2.0, 3.0, 4.0]
    assert calls == list(enumerate(TIMESTEPS))


def test_linear_ramps_from_the_first_step_to_the_last():
    assert linear_schedule(2.0, 8.0, 4) == [2.0, 4.0, 6.0, 8.0]
    assert linear_schedule(3.0, 9.0, 1) == [3.0]
    assert parse_w_schedule("linear:2:8", 4) == [2.0, 4.0, 6.0, 8.0]
    assert parse_w_schedule("1,2.5,7", 3) == [1.0, 2.5, 7.0]


@pytest.mark.parametrize("bad", ["", "linear:2", "linear:a:b", "3,,5", "cosine:1:2"])
def test_a_malformed_cli_schedule_is_one_clear_error(bad):
    with pytest.raises(ValueError, match="comma-separated numbers .* or linear:W0:W1"):
        parse_w_schedule(bad, 4)


@pytest.mark.parametrize("guidance_scale, interval, match", [
    ([5.0] * 3, None, "guidance_scale has 3 values but sampling takes 4 steps"),
    ([5.0, 0.5, 5.0, 5.0], None, r"guidance_scale\[1\] is 0.5: each w must be a finite number >= 1"),
    ([5.0, 5.0, float("inf"), 5.0], None, r"guidance_scale\[2\] is inf: each w must be a finite number >= 1"),
    (lambda i, t: float("nan"), None, r"guidance_scale returned nan at step 0 \(timestep 999\)"),
    (lambda i, t: 0.5 if i == 2 else 4.0, None, r"guidance_scale returned 0.5 at step 2 \(timestep 499\)"),
    (lambda i, t: float("inf"), None, "guidance_scale returned inf at step 0"),
    (lambda i, t: "high", None, "guidance_scale returned 'high' at step 0"),
    (float("nan"), None, "guidance_scale must be a finite number > 0"),
    (5.0, (600, 200), r"0 <= t_low <= t_high <= 1000, got \(600, 200\)"),
    (5.0, (-1, 500), r"0 <= t_low <= t_high <= 1000, got \(-1, 500\)"),
    (5.0, (0, 1001), r"0 <= t_low <= t_high <= 1000, got \(0, 1001\)"),
    (5.0, (500,), r"guidance_interval must be \(t_low, t_high\)"),
])
def test_bad_schedules_are_one_line_errors(guidance_scale, interval, match):
    with pytest.raises(ValueError, match=match) as error:
        guidance_schedule(guidance_scale, TIMESTEPS, interval, 1000)
    assert "\n" not in str(error.value)


def test_a_repeated_timestep_is_one_step_for_lists_callables_and_intervals():
    """PNDM (SD 1.x's default: N + 1 calls for N steps) and Heun (2N - 1) evaluate the model twice at some timesteps."""
    pndm, heun = [667, 334, 334, 1], [999.0, 500.5, 500.5, 1.5, 1.5]
    assert guidance_schedule([7.0, 5.0, 3.0], pndm) == [7.0, 5.0, 5.0, 3.0]
    assert guidance_schedule([7.0, 5.0, 3.0], heun) == [7.0, 5.0, 5.0, 3.0, 3.0]
    calls = []
    assert guidance_schedule(lambda i, t: calls.append((i, t)) or 2.0 + i, pndm) == [2.0, 3.0, 3.0, 4.0]
    assert calls == [(0, 667), (1, 334), (2, 1)]
    assert guidance_schedule(4.0, pndm, guidance_interval=(300, 700)) == [4.0, 4.0, 4.0, 1.0]
    with pytest.raises(ValueError, match="3 steps"):
        guidance_schedule([7.0, 5.0], heun)


@pytest.mark.parametrize("scheduler", ["PNDMScheduler", "HeunDiscreteScheduler"])
def test_a_per_step_schedule_samples_with_schedulers_that_call_the_model_twice_at_a_timestep(tiny_components, scheduler):
    import diffusers
    import torch

    from pnpguide.pipeline import PlugAndPlayPipeline

    overrides = {"skip_prk_steps": True} if scheduler == "PNDMScheduler" else {}  # as SD 1.x ships it
    pipe = PlugAndPlayPipeline(**{**tiny_components, "scheduler": getattr(diffusers, scheduler).from_config(tiny_components["scheduler"].config, **overrides)})
    pipe.set_progress_bar_config(disable=True)

    def sample(w):
        return pipe("a red circle", num_inference_steps=3, guidance_scale=w, mode="cfg", output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    torch.testing.assert_close(sample([5.0, 5.0, 5.0]), sample(5.0))
