"""benchmarks/gpu_speed.py cannot rot: its CPU smoke mode runs every step function and prints the whole table."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_speed.py"


@pytest.fixture(scope="module")
def gpu_speed():
    spec = importlib.util.spec_from_file_location("gpu_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_smoke_mode_prints_a_row_per_config_batch_and_guide_kind(gpu_speed, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert gpu_speed.main(["--device", "cpu", "--tiny", "--dtype", "float32", "--batch-sizes", "1", "2", "--repeats", "1", "--warmup", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| (sd15|sdxl) \|", line)]
    assert len(rows) == 2 * 2 * 2  # configs x batch sizes x guide kinds
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[3]) > 0 and float(cells[4]) > 0  # CFG and guided milliseconds
        assert 1 < float(cells[7].rstrip("x")) < 2  # the FLOPs ceiling of a guide that costs less than a UNet


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_a_gpu_it_says_so_and_exits_1(gpu_speed, capsys):
    assert gpu_speed.main([]) == 1
    assert "no CUDA GPU" in capsys.readouterr().out
