"""Prometheus alert rules and the Grafana dashboard refer only to metrics `oclaw serve` exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engine.config import Settings
from engine.metering.metrics import PrometheusSink
from engine.runtime import Runtime
from tests.conftest import ROOT

NAME = re.compile(r"\b((?:oclaw|process)_[a-z_]+)\b")


@pytest.fixture(scope="module")
def exported(repo: Path) -> set[str]:
    runtime = Runtime(Settings.from_env({}, model_repository=str(repo), preload=("mlp",)))
    runtime.preload()
    sink = PrometheusSink(runtime, lambda: 0)
    records = runtime.meter.records(
        request_ids=["a"],
        tenants=["t"],
        model="mlp",
        version="1",
        items=[1],
        bytes_in=[1],
        bytes_out=[1],
        statuses=[200],
        queue_ms=[0.0],
        compute_ms=1,
        total_ms=2,
        cold=True,
        source="test",
    )
    sink.emit(records)
    names = {s.name for f in text_string_to_metric_families(sink.exposition().decode()) for s in f.samples}
    runtime.close()
    return names


def test_alert_rules_use_exported_metrics(exported: set[str]) -> None:
    doc = yaml.safe_load((ROOT / "infra" / "prometheus" / "oclaw-alerts.yaml").read_text())
    rules = doc["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"OclawHighLatency", "OclawErrors", "OclawModelNotReady", "OclawMemoryHigh"}
    for rule in rules:
        assert set(rule) >= {"alert", "expr", "labels", "annotations"}
        used = set(NAME.findall(rule["expr"]))
        assert used and used <= exported, (rule["alert"], used - exported)


def test_grafana_dashboard_uses_exported_metrics(exported: set[str]) -> None:
    dashboard = json.loads((ROOT / "infra" / "grafana" / "oclaw-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 6
    for expr in exprs:
        used = set(NAME.findall(expr))
        assert used and used <= exported, (expr, used - exported)
