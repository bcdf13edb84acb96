"""benchmarks/esft_rows.py runs end to end in --quick mode and compares the three ways (numbers in docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_esft_rows_quick_prints_the_three_ways():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "esft_rows.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| how")}
    # 2 layers x 4 chosen experts x 3 x 64 x 32 weights; the masked way trains all 16 experts
    assert rows == {"rows-inplace": "49,152", "rows-copy": "49,152", "masked-full": "196,608"}
