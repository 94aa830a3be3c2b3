"""examples/demo.py end to end: an INT8 version made by ``oclaw optimize`` is served beside fp32, both classify the
photos, and the bundled example repository is left untouched; a budget that cannot hold leaves fp32 alone."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import EXAMPLES, ROOT

DEMO = ROOT / "examples" / "demo.py"
PHOTOS = ("coffee", "chelsea (a cat)", "rocket", "astronaut", "china (a palace)", "flower")


def snapshot() -> dict[str, bytes]:
    """Every file of the bundled repository and its content."""
    return {p.relative_to(EXAMPLES).as_posix(): p.read_bytes() for p in sorted(EXAMPLES.rglob("*")) if p.is_file()}


def run_demo(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(DEMO), *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_demo_serves_int8_beside_fp32_and_leaves_the_examples_alone() -> None:
    before = snapshot()
    out = run_demo()
    assert snapshot() == before
    result = re.search(
        r"^INT8 version 2 \(int8-static\) in \d+ s: ([\d.]+) MB vs ([\d.]+) MB, batch-1 latency [\d.]+ vs [\d.]+ ms, "
        r"cosine ([\d.]+) \(drop [\d.]+ <= 0\.02\)$",
        out,
        re.M,
    )
    assert result, out
    assert float(result[1]) < float(result[2]) / 2
    assert float(result[3]) >= 0.98
    assert "versions 1, 2:" in out
    assert re.search(r"^photo +fp32 \(version 1\) +INT8 \(version 2\)$", out, re.M), out
    cell = r"(.+?) \((\d+)\) (0\.\d{3}), [\d.]+ ms"
    rows = {m[1]: m for m in re.finditer(rf"^(\S.*?)  +{cell}  +{cell}$", out, re.M)}
    assert set(rows) == set(PHOTOS), out
    assert rows["coffee"][2] == rows["coffee"][5] == "espresso"
    assert sum(row[3] == row[6] for row in rows.values()) >= 5
    assert "server-side per request, fp32 (version 1):" in out
    assert "server-side per request, INT8 (version 2):" in out
    assert "server stopped on SIGTERM (exit code 0)" in out
    assert "Function URL, coffee.png: HTTP 200" in out


def test_demo_goes_on_with_fp32_when_the_int8_budget_is_not_met() -> None:
    out = run_demo("--max-drop", "0.0001")
    assert "INT8: budget not met, serving fp32 only (oclaw optimize exited 1" in out
    assert "no configuration holds the budget" in out
    assert "versions 1:" in out
    assert re.search(r"^photo +fp32 \(version 1\)$", out, re.M), out
    assert re.search(r"^coffee +espresso \(967\) 0\.\d{3}, [\d.]+ ms$", out, re.M), out
    assert "INT8 (version" not in out
    assert "Function URL, coffee.png: HTTP 200" in out
