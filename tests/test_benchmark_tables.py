"""The benchmark tables say what they measured: named columns, never a raw JSON fragment in a cell."""

from __future__ import annotations

import pytest

from benchmarks.cold import PHASE_COLUMNS, phase_parts, print_cold


def _results() -> dict[str, object]:
    floor_run = {
        "e2e_ms": 500.0,
        "interpreter_ms": 40.0,
        "phases": {"import_ms": 200.0, "session_ms": 180.0, "run_ms": 80.0, "script_ms": 460.0},
    }
    cold_start = {
        "event": "cold_start",
        "web_imports_ms": 90.0,
        "preload_ms": 300.0,
        "fetch_ms": 0.0,
        "total_ms": 420.0,
        "ready": True,
        "fastapi_loaded": False,
        "models": {"m/1": {"session_ms": 200.0, "warmup_ms": 60.0, "prepared": True}},
    }
    oclaw_run = {"e2e_ms": 600.0, "cold_start": cold_start, "session_ms": 200.0, "warmup_ms": 60.0}
    oclaw_run["outside_total_ms"] = 600.0 - 420.0
    naive_run = {"e2e_ms": 900.0}

    def summary(run: dict[str, object]) -> dict[str, object]:
        e2e = run["e2e_ms"]
        return {"n": 1, "min_ms": e2e, "median_ms": e2e, "max_ms": e2e, "median_run": run, "errors": []}

    variants = {"floor": summary(floor_run), "oclaw": summary(oclaw_run), "naive": summary(naive_run)}
    return {"m": {"variants": variants}}


def test_phase_parts_add_up_to_the_end_to_end_time() -> None:
    res = _results()
    for variant in ("floor", "oclaw"):
        run = res["m"]["variants"][variant]["median_run"]  # type: ignore[index]
        parts, note = phase_parts(variant, run)
        assert len(parts) == len(PHASE_COLUMNS)
        assert sum(p or 0.0 for p in parts) == pytest.approx(run["e2e_ms"])
        assert note and "{" not in note
    parts, note = phase_parts("naive", res["m"]["variants"]["naive"]["median_run"])  # type: ignore[index]
    assert parts == [None] * 4 and "not instrumented" in note


def test_phases_table_has_named_columns_and_no_json(capsys: pytest.CaptureFixture[str]) -> None:
    print_cold(_results())  # type: ignore[arg-type]
    out = capsys.readouterr().out
    phases = out[out.index("**Phases of the median run**") :]
    header = next(line for line in phases.splitlines() if line.startswith("| model"))
    for column in PHASE_COLUMNS:
        assert column in header
    rows = [line for line in phases.splitlines() if line.startswith("| m ")]
    assert len(rows) == 3
    assert not any("{" in row or '":' in row for row in rows)
    oclaw = next(row for row in rows if "| oclaw " in row)
    assert "prepared graph" in oclaw and "web imports 90 ms" in oclaw
