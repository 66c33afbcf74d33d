import torch

from pnpguide.teacher import cfg_combine, cfg_noise_pred


def test_cfg_at_w_1_is_the_conditional_prediction():
    uncond, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(cfg_combine(uncond, cond, 1.0), cond)  # equal up to rounding


def test_cfg_at_w_0_is_the_unconditional_prediction():
    uncond, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(cfg_combine(uncond, cond, 0.0), uncond)


def test_cfg_uses_diffusers_convention():
    uncond, cond = torch.zeros(1, 1), torch.ones(1, 1)
    assert cfg_combine(uncond, cond, 7.5).item() == 7.5  # the other convention would give 1 + 7.5 = 8.5


def test_per_sample_guidance_scales_broadcast():
    uncond, cond = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)
    out = cfg_combine(uncond, cond, torch.tensor([1.0, 2.0, 9.0]))
    assert out[:, 0, 0, 0].tolist() == [1.0, 2.0, 9.0]


def test_teacher_matches_two_separate_unet_calls(unet):
    torch.manual_seed(0)
    sample, embeds, negative = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    t = torch.tensor(400)
    with torch.no_grad():
        expected = cfg_combine(unet(sample, t, negative).sample, unet(sample, t, embeds).sample, 5.0)
        got = cfg_noise_pred(unet, sample, t, embeds, negative, 5.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_unet_takes_as_many_residuals_as_a_residual_guide_emits(unet):
    from pnpguide.guides import ResidualGuide
    from pnpguide.teacher import expected_residuals

    widths, _ = ResidualGuide.from_unet(unet).residual_widths()
    assert expected_residuals(unet) == len(widths) == 1 + 2 * 1 + 1  # conv_in, one resnet per block, one downsampler
