import pytest
import torch

from pnpguide.evaluation.speed import UNetCallCounter, count_flops, median_seconds_each, plain_attention, step_cost
from pnpguide.guide import OutputGuide, ResidualGuide


def test_plain_attention_makes_attention_flops_visible(unet):
    sample, t, embeds = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 6, 32)
    default = count_flops(lambda: unet(sample, t, embeds))
    with plain_attention(unet):
        counted = count_flops(lambda: unet(sample, t, embeds))
    assert counted > default  # SDPA on CPU counts 0; the plain processor's matmuls count


def test_plain_attention_restores_the_processors(unet):
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with plain_attention(unet):
        pass
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


@pytest.mark.parametrize("make_guide", [ResidualGuide.from_unet, lambda unet: OutputGuide.from_unet(unet, width=8)], ids=["residual", "output"])
def test_guided_step_costs_about_half_of_cfg(unet, make_guide):
    """(An output guide's width does not follow the UNet's: on this 16-channel test UNet it is made 8 wide.)"""
    cost = step_cost(unet, make_guide(unet), tokens=6)
    assert cost.cfg == 2 * cost.unet
    assert 0 < cost.guide < cost.unet
    assert 0.5 < cost.ratio < 1.0


def test_call_counter_counts_images_per_call(unet):
    counter = UNetCallCounter(unet)
    with torch.no_grad():
        unet(torch.randn(3, 4, 8, 8), 10, torch.randn(3, 6, 32))
    counter.close()
    unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 6, 32))
    assert (counter.calls, counter.images) == (1, 3)


def test_timings_for_a_ratio_take_turns_after_the_warm_up():
    calls = []
    seconds = median_seconds_each({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=1)
    assert calls == ["a", "b"] * 3  # one warm-up round, then two timed rounds in turns
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())
