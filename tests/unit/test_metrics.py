"""Metrics and JSON from hand-built Stats: no runtime needed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from allocpolicy import ProcessStats, ScopeStats, Stats
from allocpolicy.metrics import CONTENT_TYPE, METRICS, prometheus_text


def _stats() -> Stats:
    task = ScopeStats(
        name="task", mode="raise", budget=256 << 20, total_budget=None, live=10, peak=20,
        allocations=7, violations=3, instances=5, active=1, escaped=64, grace_bytes=100,
        max_instance_peak=15, refusals={"budget": 2, "oom": 0, "injected": 1, "forbidden": 0},
    )
    weird = ScopeStats(
        name='we"ird\\', mode="fallible", budget=None, total_budget=None, live=0, peak=0,
        allocations=0, violations=0, instances=0, active=0, escaped=0, grace_bytes=0, max_instance_peak=0,
    )
    process = ProcessStats(
        preloaded=True, budget=None, live=1000, peak=2000, allocations=70, violations=3, arenas_live=1,
        arena_hook=True, foreign_frees=4, grace=4 << 20,
        refusals={"budget": 2, "oom": 0, "injected": 1, "forbidden": 0},
    )
    return Stats(active=True, process=process, scopes={"task": task, weird.name: weird})


def test_json_round_trip_keeps_every_counter():
    stats = _stats()
    doc = json.loads(stats.to_json())
    assert doc["format"] == 1
    assert doc["scopes"]["task"]["refusals"] == {"budget": 2, "oom": 0, "injected": 1, "forbidden": 0}
    assert doc["process"]["budget"] is None
    assert Stats.from_dict(doc) == stats


def test_from_dict_ignores_keys_it_does_not_know_and_refuses_other_documents():
    doc = _stats().as_dict()
    doc["new_key"] = 1
    doc["scopes"]["task"]["new_counter"] = 5
    assert Stats.from_dict(doc) == _stats()
    with pytest.raises(ValueError, match="unsupported stats format 2"):
        Stats.from_dict({**doc, "format": 2})
    with pytest.raises(ValueError, match="not a stats document"):
        Stats.from_dict({"format": 1})


def test_inactive_stats_export_only_that_the_runtime_is_inactive():
    text = prometheus_text(Stats(active=False))
    assert text == (
        "# HELP allocpolicy_runtime_active 1 when the allocpolicy runtime is preloaded in this process, "
        "else 0.\n# TYPE allocpolicy_runtime_active gauge\nallocpolicy_runtime_active 0\n"
    )
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_text_exposition_parses_and_escapes_label_values():
    parser = pytest.importorskip("prometheus_client.parser")
    families = {f.name: f for f in parser.text_string_to_metric_families(prometheus_text(_stats()))}
    refusals = {tuple(sorted(s.labels.items())): s.value for s in families["allocpolicy_scope_refusals"].samples}
    assert refusals[(("reason", "budget"), ("scope", "task"))] == 2
    assert refusals[(("reason", "injected"), ("scope", "task"))] == 1
    assert refusals[(("reason", "budget"), ("scope", 'we"ird\\'))] == 0
    assert families["allocpolicy_scope_refusals"].type == "counter"
    # An unset budget is no sample, not a budget of 0.
    budgets = {s.labels["scope"]: s.value for s in families["allocpolicy_scope_budget_bytes"].samples}
    assert budgets == {"task": 256 << 20}
    assert "allocpolicy_process_budget_bytes" not in families


def test_prometheus_client_collector_says_what_the_text_says():
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from allocpolicy.metrics.prometheus import AllocPolicyCollector, register

    registry = CollectorRegistry()
    registry.register(AllocPolicyCollector(_stats))

    def samples(text):
        return {(s.name, tuple(sorted(s.labels.items())), s.value)
                for f in text_string_to_metric_families(text) for s in f.samples}

    assert samples(generate_latest(registry).decode()) == samples(prometheus_text(_stats()))
    # Registering twice is prometheus_client's duplicate error, not a silent double count.
    default = CollectorRegistry()
    register(default)
    with pytest.raises(ValueError, match="Duplicated"):
        register(default)


def test_opentelemetry_instruments_observe_the_same_values(monkeypatch):
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from allocpolicy.metrics import otel

    monkeypatch.setattr(otel, "_take_stats", _stats)
    reader = InMemoryMetricReader()
    instruments = otel.instrument(MeterProvider(metric_readers=[reader]))
    assert len(instruments) == len(METRICS)
    got = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            assert sm.scope.name == "allocpolicy"
            for m in sm.metrics:
                got[m.name] = (m.unit, {tuple(sorted(p.attributes.items())): p.value for p in m.data.data_points})
    unit, points = got["allocpolicy.scope.refusals"]
    assert unit == "{refusal}"
    assert points[(("allocpolicy.reason", "budget"), ("allocpolicy.scope", "task"))] == 2
    assert got["allocpolicy.scope.live"] == ("By", {(("allocpolicy.scope", "task"),): 10,
                                                    (("allocpolicy.scope", 'we"ird\\'),): 0})
    assert got["allocpolicy.scope.escaped"][1][(("allocpolicy.scope", "task"),)] == 64


def test_importing_allocpolicy_and_its_metrics_imports_no_framework():
    code = (
        "import sys, allocpolicy, allocpolicy.metrics\n"
        "allocpolicy.metrics.prometheus_text()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('prometheus_client', 'opentelemetry')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_docs_list_every_metric_with_its_type():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "observing.rst").read_text()
    rows = {line.split()[0].strip("`"): line.split()[1] for line in page.splitlines()
            if line.startswith("``allocpolicy_")}
    assert rows == {(m.name + "_total" if m.kind == "counter" else m.name): m.kind for m in METRICS}


def test_the_table_says_why_allocations_were_refused():
    lines = _stats().format().splitlines()
    assert lines[0] == (
        "process: live 1000 B, peak 1.95 KiB, budget -, 70 allocations, 3 refused (budget 2, injected 1)"
    )
    assert lines[2].split() == ["task", "raise", "256", "MiB", "10", "B", "15", "B", "5", "3", "64", "B"]


@pytest.mark.parametrize("module, missing, extra", [
    ("prometheus", "prometheus_client", "prometheus"),
    ("otel", "opentelemetry", "otel"),
])
def test_an_exporter_without_its_package_says_what_to_install(monkeypatch, module, missing, extra):
    import importlib

    for name in [missing, *(n for n in sys.modules if n.startswith(missing + "."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, f"allocpolicy.metrics.{module}", raising=False)
    with pytest.raises(ModuleNotFoundError) as info:
        importlib.import_module(f"allocpolicy.metrics.{module}")
    assert info.value.name.split(".")[0] == missing
    assert f"allocpolicy.metrics.{module} needs " in str(info.value)
    assert f"pip install 'allocpolicy[{extra}]'" in str(info.value)
