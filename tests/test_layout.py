"""The method and the evaluation harness stand without the embedded shapes world: it is imported only when the
embedded model is the one in use (its captions, judge and FID features)."""

import subprocess
import sys

GENERAL_MODULES = [
    "pnpguide", "pnpguide.cli", "pnpguide.pipeline", "pnpguide.pipeline_xl", "pnpguide.guides", "pnpguide.teacher",
    "pnpguide.carry", "pnpguide.policy", "pnpguide.distill_guidance", "pnpguide.distill_steps", "pnpguide.training",
    "pnpguide.sources", "pnpguide.run_folder", "pnpguide.doctor", "pnpguide.generate", "pnpguide.evaluation.evaluate",
    "pnpguide.evaluation.fid", "pnpguide.evaluation.negative_prompts", "pnpguide.evaluation.methods",
    "pnpguide.evaluation.report", "pnpguide.evaluation.gap", "pnpguide.evaluation.sampling",
]


def test_the_method_and_the_harness_import_without_the_embedded_world():
    code = ("import importlib, sys\n"
            f"for name in {GENERAL_MODULES!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('pnpguide.embedded')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
