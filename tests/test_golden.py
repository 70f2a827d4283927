"""Nothing a run computes changes unnoticed: every golden distill run (tests/golden_runs.py) gives the recorded
losses and weights. On the machine that recorded them (same CPU, threads and library versions) the weights must
match bit for bit; elsewhere float kernels may round differently, so losses and weight sums match closely."""

from __future__ import annotations

import json

import pytest
from golden_runs import CASES, GOLDEN, build_inputs, machine_signature, run_case

GOLD = json.loads(GOLDEN.read_text())
SAME_MACHINE = GOLD["machine"] == machine_signature()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    work = tmp_path_factory.mktemp("golden")
    return (*build_inputs(work), work)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_distill_matches_the_golden_run(inputs, name):
    teachers, data, work = inputs
    got, want = run_case(name, teachers, data, work), GOLD["cases"][name]
    if SAME_MACHINE:
        assert got["losses"] == want["losses"]
        assert {k: v["sha256"] for k, v in got["weights"].items()} == {
            k: v["sha256"] for k, v in want["weights"].items()
        }
    else:
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-4, abs=1e-7)
        for key, w in want["weights"].items():
            assert got["weights"][key]["tensors"] == w["tensors"]
            assert got["weights"][key]["sum"] == pytest.approx(w["sum"], rel=1e-4, abs=1e-6)
            assert got["weights"][key]["abs_sum"] == pytest.approx(w["abs_sum"], rel=1e-4)
