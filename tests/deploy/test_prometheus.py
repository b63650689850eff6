"""Alert rules, their promtool unit tests, the Grafana dashboard, and a real Prometheus scraping a real guard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from guard.metrics import GuardMetrics
from guard.transport.workers import PoolCollector
from tests.guard.conftest import GuardProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "trojan-guard.json"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"'{name}' not found: install the Debian package 'prometheus' (make test does)"
    return path


def _alerts() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def test_alert_rules_are_valid_and_pass_their_unit_tests() -> None:
    check = subprocess.run([_tool("promtool"), "check", "rules", str(PROM / "alerts.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([_tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=PROM,
                          capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROM / "alerts_test.yml").read_text()))
    assert tested == {r["alert"] for r in _alerts()}, "every alert needs a unit test"


def test_every_alert_has_for_severity_summary_and_a_runbook_entry() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {re.sub(r"[^a-z0-9-]", "", h.strip().lower().replace(" ", "-"))
               for h in re.findall(r"^#+ (.+)$", runbook, flags=re.M)}
    for rule in _alerts():
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("docs/runbook.md#") and url.split("#")[1] in anchors, (rule["alert"], url)


def _exported_names() -> set[str]:
    """Every sample name the guard can export, from its own metric definitions."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count",
                                                                              "_created")}
    names = set()
    supervisor = PoolCollector(SimpleNamespace(workers=[]))  # serve --workers: the supervisor's own
    for family in [*GuardMetrics().registry.collect(), *supervisor.collect()]:
        names |= {family.name + s for s in suffixes[family.type]}
    return names


def _queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    return exprs


def _instantiate(expr: str) -> str:
    """Grafana variables replaced as Grafana would for a query to Prometheus."""
    return expr.replace("$__rate_interval", "1m").replace("$model", ".*")


def test_dashboard_names_only_metrics_the_guard_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "model"}
    assert all(p.get("datasource", {}).get("uid") == "${datasource}" for p in dashboard["panels"] if p["type"] != "row")
    exported = _exported_names()
    used = {name for expr in _queries() for name in re.findall(r"\btrojan_guard_[a-z_]+", expr)}
    assert used and not used - exported, f"not exported by the guard: {sorted(used - exported)}"
    for rule in _alerts():
        names = set(re.findall(r"\btrojan_guard_[a-z_]+", rule["expr"]))
        assert not names - exported, (rule["alert"], sorted(names - exported))


def _api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_prometheus_scrapes_the_guard_and_a_trigger_campaign_raises_the_alert(
        guard_only_bundle: Path, tmp_path: Path, traffic: dict[str, np.ndarray]) -> None:
    guard = GuardProcess(guard_only_bundle, tmp_path)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROM / "alerts.yml")],
        "scrape_configs": [{"job_name": "trojan-guard",
                            "static_configs": [{"targets": [f"127.0.0.1:{guard.metrics_port}"]}]}],
    }))
    log = open(tmp_path / "prometheus.log", "w")
    prometheus = subprocess.Popen([_tool("prometheus"), f"--config.file={config}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}",
                                   f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                targets = _api(port, "targets")["data"]["activeTargets"]
                if targets and targets[0]["health"] == "up":
                    break
            except OSError:
                pass
            assert prometheus.poll() is None and time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.5)
        rules = [r for g in _api(port, "rules")["data"]["groups"] for r in g["rules"]]
        assert len(rules) == len(_alerts()) and all(r["health"] != "err" for r in rules), rules

        # every dashboard query parses and runs against the real server
        for expr in _queries():
            assert _api(port, "query", query=_instantiate(expr))["status"] == "success", expr

        # the campaign: a first wave, scraped, then a burst
        for x in traffic["triggered_x"][:5]:
            _refuse(guard, x)
        time.sleep(3)
        for x in np.concatenate([traffic["triggered_x"], traffic["triggered_x"]])[:40]:
            _refuse(guard, x)
        deadline = time.monotonic() + 60
        state = None
        while state not in ("pending", "firing"):
            alerts = _api(port, "alerts")["data"]["alerts"]
            state = next((a["state"] for a in alerts if a["labels"]["alertname"] == "TrojanGuardTriggerCampaign"),
                         None)
            assert time.monotonic() < deadline, alerts
            time.sleep(1)
        campaign = next(a for a in alerts if a["labels"]["alertname"] == "TrojanGuardTriggerCampaign")
        assert campaign["labels"]["model"] == "model" and campaign["labels"]["severity"] == "critical"
        assert not any(a["labels"]["alertname"] in ("TrojanGuardDown", "TrojanGuardNotReady") for a in alerts)
        flagged = _api(port, "query", query='sum(trojan_guard_requests_total{verdict="flagged"})')
        assert float(flagged["data"]["result"][0]["value"][1]) >= 40
    finally:
        prometheus.terminate()
        prometheus.wait(30)
        log.close()
        guard.stop()


def _refuse(guard: GuardProcess, x: np.ndarray) -> None:
    import grpc

    try:
        guard.infer(x[None])
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.PERMISSION_DENIED, exc.details()
