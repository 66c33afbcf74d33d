"""The benchmark scripts the docs cite cannot rot: each runs end to end in its smoke setting and prints its table."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_speed_smoke_run_times_every_method_on_both_layouts(one_thread, capsys, tmp_path):
    out = tmp_path / "speed.json"
    assert script("speed").main(["--device", "cpu", "--tiny", "--dtype", "float32", "--steps", "2", "--batch-sizes", "2",
                                 "--sdxl-batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--no-compile", "--training", "--out", str(out)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| (sd15|sdxl) \|", line)]
    methods = ("cfg", "default guide", "paper guide", "cfg + carry", "8-step guide", "4-step guide", "single pass")
    assert [row.split("|")[4].strip() for row in rows] == list(methods) * 2  # SD1.5 at batch 2, then SDXL at batch 1
    assert all(float(row.split("|")[5]) > 0 for row in rows)
    assert '"teacher trajectories per minute"' in out.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_speed_without_a_gpu_says_so_and_exits_1(capsys):
    assert script("speed").main([]) == 1
    assert "no CUDA GPU" in capsys.readouterr().out


@pytest.mark.integration
def test_image_gap_measures_a_shipped_guide_as_a_user_samples_it(one_thread, tmp_path):
    result = script("image_gap").main(["--guide", "8-step", "--prompts", "2", "--scales", "7.5", "--policies", "carry:2", "ag+carry:0.99",
                                          "--reference-steps", "10", "--plot", str(tmp_path / "gap.png")])
    guide, carried, adaptive = result["rows"]
    assert (guide["method"], guide["steps"], guide["reference_steps"]) == ("guide 8-step", 8, 10)
    assert 0.4 < guide["unet_passes_over_cfg"] <= 0.5 and guide["unet_passes_per_image"] == pytest.approx(8)
    assert carried["unet_passes_over_cfg"] == pytest.approx(27 / 50)  # CFG for 2 of 25 steps, one pass after
    assert all(-2 < row["image_gap_closed"][7.5] < 1 for row in (guide, carried, adaptive))
    one, two = guide["image_gap_closed_by_kind"][7.5].values()  # pooled over both halves: a weighted mean of the two
    assert min(one, two) - 1e-6 <= guide["image_gap_closed"][7.5] <= max(one, two) + 1e-6 and one != two
    assert Image.open(tmp_path / "gap.png").size[0] > 500


@pytest.mark.integration
def test_guide_errors_probes_each_guided_step_and_cfgs_correction_in_their_place(one_thread):
    result = script("guide_errors").main(["--prompts", "2", "--scales", "7.5", "--exact", "4", "0-4"])
    fit = result["fit"]
    assert set(fit) == {"its own states, w = 7.5", "CFG's states, w = 7.5"} and all(len(row) == 5 for row in fit.values())
    assert all(0 < value <= 1 for row in fit.values() for value in row)
    gaps = result["image_gap_closed"]
    assert list(gaps) == ["none", "4", "0-4"]
    assert gaps["0-4"][7.5] != gaps["none"][7.5]  # CFG's correction in the guide's place changes the images
    assert script("guide_errors").step_set("0-2,4") == {0, 1, 2, 4}


@pytest.mark.integration
def test_residual_oracle_smoke_run(one_thread):
    result = script("residual_oracle").main(["--prompts", "2", "--steps", "4", "--at", "0", "2", "--adam-steps", "3", "--scales", "5"])
    assert [(row["step"], row["t"]) for row in result["rows"]] == [(0, 999), (2, 499)]
    assert all(0 < row["residuals on the base"] <= 1 for row in result["rows"])  # even 3 Adam steps close some of CFG's gap


@pytest.mark.integration
def test_correction_coherence_smoke_run(one_thread):
    result = script("correction_coherence").main(["--prompts", "4", "--steps", "4"])
    assert [row["t"] for row in result["rows"]] == [999.0, 749.0, 499.0, 249.0]
    assert sum(row["share of the energy"] for row in result["rows"]) == pytest.approx(1.0, abs=1e-4)
