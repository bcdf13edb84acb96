"""benchmarks/full_model.py and benchmarks/gpu_check.py run end to end with --small (tiny shapes, CPU).

Timings are not asserted (tiny shapes on a shared machine); what is pinned: every method
ran, the planner's trainable counts equal the built models', every generation produced its
tokens, and the GPU check's correctness part compares every variant and passes on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--small", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_full_model_small_runs_every_method_with_the_planner_beside(tmp_path):
    out = _run("full_model.py", "--model", "olmoe", "--json", str(tmp_path / "r.json"))
    assert "| perft-r |" in out and "planner total" in out
    rows = json.loads((tmp_path / "r.json").read_text())["results"][0]["rows"]
    assert list(rows) == ["base", "perft-r", "perft-e", "perft-d", "perft-s", "lora-qv"]
    # PERFT-R 4 x r16 on 2 blocks of width 64: 2 x (4 x 2 x 16 x 64 + 4 x 64)
    assert rows["perft-r"]["trainable"] == rows["perft-r"]["planner"]["trainable"] == 16_896
    for name, row in rows.items():
        assert row["planner"]["trainable"] == row["trainable"], name
        assert row["generated"] == 4 and row["step_cpu"] > 0
        assert row["experts_hit"] == rows["base"]["experts_hit"], name  # step-0 adapters: the base routing
    assert rows["base"]["trainable"] == 0


def test_gpu_check_small_passes_on_cpu(tmp_path):
    out = _run("gpu_check.py", "--device", "cpu", "--json", str(tmp_path / "g.json"))
    result = json.loads((tmp_path / "g.json").read_text())
    names = [r["method"] for r in result["correctness"]]
    assert len(names) == 9 and "lora-qv" in names and "perft-e-parallel" in names
    assert all(r["ok"] for r in result["correctness"]) and "all 9 passed" in out
    assert all(r["loss_rel"] < 2e-2 for r in result["correctness"])
    assert [r["method"] for r in result["model"]["rows"]] == ["base", "perft-r", "perft-e", "perft-d", "perft-s",
                                                              "lora-qv"]
    assert result["model"]["generation"]["tokens"] == 4
