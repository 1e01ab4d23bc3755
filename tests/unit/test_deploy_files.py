"""deploy/: the Grafana dashboard and the Prometheus files use only the metrics pool exports, and
the dashboard shows every one of them.

The metric names are read from the code (the collectors pool/metrics.py registers and the
coordinator's own gauges), never from a list here: a metric renamed or added there without the
same change in deploy/ fails these tests instead of leaving a panel or an alert silently blank."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "pool-dashboard.json"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "pool-alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "pool-alerts.test.yml"


# --- the metric contract, read from the code ------------------------------------------------
def exported_families() -> dict[str, str]:
    """{family name: type} of every metric a pool coordinator's /metrics serves: the pollers'
    collectors (registered when pool.metrics is imported) and the coordinator's own gauges."""
    from prometheus_client import REGISTRY

    import pool.metrics  # noqa: F401 - registers the pollers' collectors
    from pool.coordinator import StatusCollector
    from pool.status import Snapshot

    families = {}
    for family in REGISTRY.collect():
        # prometheus_client's own process and platform collectors are not served by pool.
        if not family.name.startswith(("python_", "process_")):
            families[family.name] = family.type
    # Every figure present: a gauge whose figure is unknown is left out of a scrape.
    full = Snapshot(refreshed_at=1.0, queue_depth=0, backlog=0, lag_seconds=0.0, dead=0, shards={0: 0})
    for family in StatusCollector(lambda: full).collect():
        families[family.name] = family.type
    return families


FAMILIES = exported_families()
# A counter is exported with _total; a histogram as _bucket, _sum and _count.
COUNTERS = {f"{name}_total" for name, kind in FAMILIES.items() if kind == "counter"}
HISTOGRAMS = {name for name, kind in FAMILIES.items() if kind == "histogram"}
GAUGES = {name for name, kind in FAMILIES.items() if kind == "gauge"}
KNOWN_METRICS = COUNTERS | HISTOGRAMS | GAUGES
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
METRIC_NAME = re.compile(r"pool_[a-z_]+")

REQUIRED_ALERTS = {
    "PoolNoLivePollers",
    "PoolLagHigh",
    "PoolDeadRowsIncreasing",
    "PoolDatabaseErrors",
    "PoolBackpressurePaused",
}


def contract_name(series: str) -> str:
    """The contract name of an exported series: a histogram's _bucket/_sum/_count is stripped."""
    base = HISTOGRAM_SUFFIX.sub("", series)
    return base if base in HISTOGRAMS else series


def unknown_metrics(expr: str) -> list[str]:
    """Names in a PromQL expression that pool does not export (a bare histogram name included:
    Prometheus only has its _bucket, _sum and _count series)."""
    unknown = []
    for series in METRIC_NAME.findall(expr):
        name = contract_name(series)
        if name not in KNOWN_METRICS or series in HISTOGRAMS:
            unknown.append(series)
    return unknown


def test_the_contract_is_read_from_the_code() -> None:
    """The walk finds the pollers' and the coordinator's metrics, and only kinds handled here."""
    assert set(FAMILIES.values()) <= {"counter", "histogram", "gauge"}, FAMILIES
    assert all(name.startswith("pool_") for name in FAMILIES), sorted(FAMILIES)
    # One of each source and kind, so that an empty or partial walk cannot pass unnoticed.
    assert {"pool_signals_acked_total", "pool_batch_duration_seconds", "pool_poller_pid",
            "pool_backlog_shard_rows", "pool_status_refresh_timestamp_seconds"} <= KNOWN_METRICS


def test_the_readme_describes_every_metric() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert {name for name in KNOWN_METRICS if f"`{name}" not in readme} == set()


def test_the_contract_name_helpers() -> None:
    assert contract_name("pool_batch_duration_seconds_bucket") == "pool_batch_duration_seconds"
    assert contract_name("pool_batch_size_rows_count") == "pool_batch_size_rows"
    assert contract_name("pool_signals_acked_total") == "pool_signals_acked_total"
    assert unknown_metrics('rate(pool_signals_acked_total{job="pool"}[5m])') == []
    assert unknown_metrics("rate(pool_signals_acked[5m])") == ["pool_signals_acked"]
    assert unknown_metrics("pool_batch_duration_seconds") == ["pool_batch_duration_seconds"]
    assert unknown_metrics("pool_lag_seconds_count") == ["pool_lag_seconds_count"]


# --- the dashboard -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, the ones inside collapsed rows included; row panels themselves are not."""
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    exprs = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            exprs.append((f"panel {panel['title']!r} target {target.get('refId')}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            exprs.append((f"variable {variable['name']}", text))
    return exprs


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "pool-relay"
    assert dashboard["title"] == "pool relay"
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["id"] is None  # importable into any Grafana without clashing


def test_dashboard_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance"} & variables.keys()
    for name in ("job", "instance"):
        if name in variables:
            assert variables[name]["type"] == "query"
            assert variables[name]["datasource"]["uid"] == "${datasource}"


def test_every_panel_has_a_target_a_description_and_the_datasource_variable(
    dashboard: dict[str, Any],
) -> None:
    panels = list(all_panels(dashboard))
    assert len(panels) >= 10
    for panel in panels:
        title = panel.get("title")
        assert panel["type"] in {"timeseries", "stat"}, title
        assert panel.get("description", "").strip(), f"panel {title!r} has no description"
        assert panel.get("targets"), f"panel {title!r} has no target"
        assert panel["datasource"]["uid"] == "${datasource}", title
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"panel {title!r} target {target['refId']} is empty"
            assert target["datasource"]["uid"] == "${datasource}", title


def test_panel_ids_are_unique_and_panels_fit_the_grid(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in all_panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_uses_only_known_metrics(dashboard: dict[str, Any]) -> None:
    problems = {where: bad for where, expr in dashboard_exprs(dashboard) if (bad := unknown_metrics(expr))}
    assert problems == {}


def test_dashboard_covers_the_whole_contract(dashboard: dict[str, Any]) -> None:
    used = {contract_name(series) for _, expr in dashboard_exprs(dashboard)
            for series in METRIC_NAME.findall(expr)}
    assert KNOWN_METRICS - used == set()


def test_every_panel_query_filters_by_the_variables(dashboard: dict[str, Any]) -> None:
    for where, expr in dashboard_exprs(dashboard):
        if where.startswith("variable"):
            continue
        for selector in re.findall(r"pool_[a-z_]+(\{[^}]*\})?", expr):
            assert 'job="$job"' in selector and 'instance=~"$instance"' in selector, (where, expr)


def test_rates_use_the_rate_interval(dashboard: dict[str, Any]) -> None:
    for where, expr in dashboard_exprs(dashboard):
        windows = re.findall(r"\[([^\]]*)\]", expr)
        assert all(window == "$__rate_interval" for window in windows), (where, expr)
        if "rate(" in expr or "increase(" in expr:
            assert windows, (where, expr)


def test_latency_quantiles_aggregate_buckets_by_le(dashboard: dict[str, Any]) -> None:
    for where, expr in dashboard_exprs(dashboard):
        for call in re.findall(r"histogram_quantile\([^,]+,(.*)", expr):
            assert "sum by (le) (rate(" in call and "_bucket{" in call, (where, expr)


# --- Prometheus --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_prometheus_config_scrapes_the_coordinator(prometheus_config: dict[str, Any]) -> None:
    assert prometheus_config["global"]["scrape_interval"] == "15s"
    jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
    pool = jobs["pool"]
    assert pool.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for static in pool["static_configs"] for t in static["targets"]]
    assert "127.0.0.1:9200" in targets
    assert all(target.endswith(":9200") for target in targets)


def test_prometheus_config_loads_the_alert_rules(prometheus_config: dict[str, Any]) -> None:
    rule_files = prometheus_config["rule_files"]
    assert rule_files
    for rule_file in rule_files:
        assert (PROMETHEUS_DIR / rule_file).is_file(), rule_file
    assert ALERTS.name in rule_files


def test_alert_rules_are_complete_and_use_only_known_metrics(alert_rules: list[dict[str, Any]]) -> None:
    names = [rule["alert"] for rule in alert_rules]
    assert len(names) == len(set(names))
    assert REQUIRED_ALERTS - set(names) == set()
    for rule in alert_rules:
        assert rule["expr"].strip(), rule["alert"]
        assert unknown_metrics(rule["expr"]) == [], rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_alert_unit_tests_feed_only_exported_series(alert_rules: list[dict[str, Any]]) -> None:
    """promtool's alert tests prove something only with the series pool really exports, and only
    for alerts they see fire."""
    document = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    fired = set()
    for case in document["tests"]:
        for series in case["input_series"]:
            assert unknown_metrics(series["series"]) == [], series["series"]
        fired |= {check["alertname"] for check in case["alert_rule_test"] if check["exp_alerts"]}
    assert {rule["alert"] for rule in alert_rules} - fired == set()


def test_alert_durations(alert_rules: list[dict[str, Any]]) -> None:
    rules = {rule["alert"]: rule for rule in alert_rules}
    assert rules["PoolNoLivePollers"]["for"] == "1m"
    assert rules["PoolLagHigh"]["for"] == "10m"
    assert "300" in rules["PoolLagHigh"]["expr"]
    assert rules["PoolDatabaseErrors"]["for"] == "5m"
    assert rules["PoolBackpressurePaused"]["for"] == "10m"


# --- promtool: scripts/test.sh puts it in the venv --------------------------------------------
def find_promtool() -> str | None:
    """promtool on the PATH, or beside this interpreter (where scripts/test.sh installs it)."""
    return shutil.which("promtool") or shutil.which("promtool", path=os.path.dirname(sys.executable))


def run_promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> None:
    promtool = find_promtool()
    if promtool is None:
        message = "promtool is neither on the PATH nor in the venv (scripts/test.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true: the only check that the alerts fire may not skip)")
        pytest.skip(message)
    result = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config() -> None:
    run_promtool("check", "config", PROMETHEUS_CONFIG.name)


def test_promtool_check_rules() -> None:
    run_promtool("check", "rules", ALERTS.name)


def test_promtool_test_rules() -> None:
    """The alerts fire on the series they are meant for, and only on those."""
    run_promtool("test", "rules", ALERT_TESTS.name)


def test_promtool_parses_every_dashboard_query(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, as a recording rule promtool checks."""
    rules = []
    for index, (where, expr) in enumerate(dashboard_exprs(dashboard)):
        if where.startswith("variable"):
            continue  # label_values() is Grafana's, not PromQL
        promql = (expr.replace("$__rate_interval", "1m").replace("$job", "pool")
                  .replace("$instance", ".*"))
        rules.append({"record": f"pool_dashboard:query_{index}", "expr": promql})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    run_promtool("check", "rules", str(path), cwd=tmp_path)
