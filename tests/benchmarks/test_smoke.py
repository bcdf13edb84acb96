"""The benchmark scripts run end to end in --quick mode and print every compared method.

Timings are not asserted: --quick uses tiny shapes on a shared machine; the measured
numbers live in docs/benchmarks.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("base", "perft-r", "perft-e", "perft-d", "perft-s", "lora-qv", "lora-experts", "loop-r")


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _rows(out: str, title: str) -> dict[str, list[str]]:
    """The table rows (method -> cells) of the section whose title contains `title`."""
    section = out.split(title, 1)[1].split("###", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in METHODS:
            rows[cells[0]] = cells
    return rows


# Trainable parameters and LoRA ranks of --quick as measured before the methods were built
# through the registry (perft.methods); a changed training default leaking in changes them.
QUICK_TRAINABLE = {
    "layer": {"base": "0", "perft-r": "16,896", "perft-e": "32,768", "perft-d": "8,192", "perft-s": "2,048",
              "lora-qv": "16,896", "lora-experts": "17,920", "loop-r": "16,896"},
    "small": {"base": "0", "perft-r": "16,896", "perft-e": "16,384", "perft-d": "8,192", "perft-s": "2,048",
              "lora-qv": "16,896", "lora-experts": "17,920", "loop-r": "16,896"},
}
QUICK_SETTINGS = {
    "layer": {"perft-e": "N=16 (base top-k), r=16", "lora-qv": "PEFT LoRA q,v r=66",
              "lora-experts": "PEFT LoRA on fused experts r=5"},
    "small": {"perft-e": "N=8 (base top-k), r=16", "lora-qv": "PEFT LoRA q,v r=66",
              "lora-experts": "PEFT LoRA on fused experts r=7"},
}


@pytest.mark.parametrize("target", ["layer", "small"])
def test_step_time_quick_prints_every_method(target, tmp_path):
    out = _run("step_time.py", "--target", target, "--json", str(tmp_path / "r.json"))
    rows = _rows(out, f"### {target} (")
    assert set(rows) == set(METHODS)
    assert rows["base"][3] == "1.000x"  # step CPU / base
    assert rows["base"][1] == "0" and all(int(rows[m][1].replace(",", "")) > 0 for m in METHODS[1:])
    assert rows["perft-r"][1] == rows["loop-r"][1]  # the reference design has the very same tensors
    assert {m: rows[m][1] for m in METHODS} == QUICK_TRAINABLE[target]
    assert {m: rows[m][-1] for m in QUICK_SETTINGS[target]} == QUICK_SETTINGS[target]
    assert rows["perft-r"][-1] == "N=8, top-2, r=16"
    assert rows["loop-r"][-1] == "N=8, top-2, r=16; per-expert Python loop"
    # loop-r (the registered routed_loop variant) computes the same output as perft-r's stacked products
    diff = float(out.split("max |diff|:", 1)[1].split()[0])
    assert diff < 1e-6
    assert (tmp_path / "r.json").is_file()


def test_generation_quick_prints_every_method():
    out = _run("generation.py", "--target", "layer")
    rows = _rows(out, "### generation, layer")
    assert set(rows) == set(METHODS)
    assert all(rows[m][2] == "4" for m in METHODS)  # every method generated the requested tokens


def test_mixed_adapters_quick_prints_the_three_cases():
    out = _run("mixed_adapters.py", "--target", "small")
    table = out.split("mixed-batch generation, small", 1)[1]
    for case in ("| 1 adapter |", "| 1 adapter via adapter_names |", "| 8 adapters |"):
        assert case in table
    assert "| 32 |" in table  # 8 rows x 4 new tokens generated in every case
