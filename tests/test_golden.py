"""Nothing a run computes changes unnoticed: every golden distill run (tests/golden_runs.py) gives the recorded
losses and weights. The runs start in a fresh interpreter (other test modules change process-wide settings such as
torch's thread count at import, and float rounding depends on them). On the machine that recorded them (same CPU,
threads and library versions) losses and weights must match bit for bit; on another CPU float kernels may round
differently, so losses and weight sums must match closely. Other library versions build other tiny teachers (their
random initialisation differs), so there the comparison is skipped with a message saying so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from golden_runs import CASES, GOLDEN

GOLD = json.loads(GOLDEN.read_text())
HALF_PRECISION = {name for name, *_, extra in CASES if "bf16" in extra}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    result = tmp_path_factory.mktemp("golden") / "runs.json"
    script = Path(__file__).parent / "golden_runs.py"
    proc = subprocess.run([sys.executable, str(script), "--to", str(result)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(result.read_text())


LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate")


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_distill_matches_the_golden_run(runs, name):
    versions = {k: runs["machine"][k] for k in LIBRARIES}
    recorded = {k: GOLD["machine"][k] for k in LIBRARIES}
    if versions != recorded:  # the tiny teachers' random weights themselves differ between library versions
        pytest.skip(f"golden runs were recorded with {recorded}, this is {versions}: compare the restructured code "
                    "with them there, or record anew with tests/golden_runs.py --write")  # fmt: skip
    got, want = runs["cases"][name], GOLD["cases"][name]
    if runs["machine"] == GOLD["machine"]:
        assert got["losses"] == want["losses"]
        assert {k: v["sha256"] for k, v in got["weights"].items()} == {
            k: v["sha256"] for k, v in want["weights"].items()
        }
    else:
        rel = 5e-2 if name in HALF_PRECISION else 1e-4  # bf16 keeps 8 bits: other kernels round it further apart
        assert got["losses"] == pytest.approx(want["losses"], rel=rel, abs=1e-7)
        for key, w in want["weights"].items():
            assert got["weights"][key]["tensors"] == w["tensors"]
            assert got["weights"][key]["sum"] == pytest.approx(w["sum"], rel=rel, abs=1e-6)
            assert got["weights"][key]["abs_sum"] == pytest.approx(w["abs_sum"], rel=rel)
