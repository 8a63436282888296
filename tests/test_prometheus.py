"""The monitoring that deploy/ ships, run by the real thing: Debian's ``prometheus`` package (installed by
scripts/setup.sh) brings Prometheus and promtool.

- ``promtool check config`` on deploy/prometheus/prometheus.yml and ``promtool check rules`` on alerts.yml and on the
  PrometheusRule's groups;
- ``promtool test rules`` on deploy/prometheus/alerts.test.yml, which must cover every alert with a case that fires
  it and one that stays quiet;
- a real Prometheus (localhost, a free port, its data in a temporary folder) scrapes a real linlens server's
  /metrics with the alert rules loaded, and the dashboard's own panel expressions, evaluated by Prometheus over the
  scraped series, return what the requests made in the test imply.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port

from linlens.client import NO_RETRY, Client, DeadlineExceededError, ExplainOptions, InvalidArgumentError

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus"


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (scripts/setup.sh installs Debian's prometheus package as root)")
    return found


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


def test_promtool_checks_the_shipped_config(tmp_path: Path) -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    # compose mounts alerts.yml at /etc/prometheus/alerts.yml; point the copy at the file it mounts
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(PROMETHEUS / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_checks_the_rules_and_the_prometheusrule(tmp_path: Path) -> None:
    result = promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    rule = next(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "prometheusrule.yaml").read_text()))
    (tmp_path / "operator-rules.yml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = promtool("check", "rules", str(tmp_path / "operator-rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10 rules found" in result.stdout


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_stays_quiet() -> None:
    alerts = {r["alert"] for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    cases = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
    fires = {c["alertname"] for t in cases for c in t["alert_rule_test"] if c["exp_alerts"]}
    quiet = {c["alertname"] for t in cases for c in t["alert_rule_test"] if not c["exp_alerts"]}
    assert fires == alerts, f"no case fires: {sorted(alerts - fires)}"
    assert quiet == alerts, f"no quiet case: {sorted(alerts - quiet)}"
    result = promtool("test", "rules", "alerts.test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# --- a real scrape ---------------------------------------------------------------------------------------------------


class Prometheus:
    """A Prometheus process on 127.0.0.1 that scrapes one target every second."""

    def __init__(self, folder: Path, metrics_target: str) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROMETHEUS / "alerts.yml")],
            "scrape_configs": [
                {
                    "job_name": "linlens",
                    "static_configs": [{"targets": [metrics_target], "labels": {"service": "linlens"}}],
                }
            ],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = folder / "prometheus.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={folder / 'prometheus.yml'}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=log,
                cwd=folder,
            )
        self.wait_for(lambda: self.get("/-/ready") is not None, "Prometheus to be ready")

    def get(self, path: str) -> Any:
        assert self.process.poll() is None, self.log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                body = response.read().decode()
        except OSError:
            return None
        return json.loads(body) if body.startswith("{") else body

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert reply is not None and reply["status"] == "success", reply
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < end, f"timed out waiting for {what}: {self.log.read_text()[-2000:]}"
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture
def prometheus_and_server(make_server: Callable[..., Any], tmp_path: Path) -> Iterator[tuple[Prometheus, Any]]:
    tool("prometheus")
    server = make_server(metrics_port=free_port(), metrics_host="127.0.0.1")
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{server.metrics_port}")
    try:
        yield prometheus, server
    finally:
        prometheus.stop()


def grafana(expr: str) -> str:
    """A dashboard expression with Grafana's variables as a person viewing all models would have them."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "5m")
        .replace('"$model"', '".*"')
    )


def panel_expr(title: str, index: int = 0) -> str:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "linlens.json").read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    (panel,) = [p for p in panels(dashboard["panels"]) if p["title"] == title]
    return grafana(panel["targets"][index]["expr"])


@pytest.mark.slow
def test_a_real_prometheus_scrapes_a_real_server_and_the_panels_read_it(
    prometheus_and_server: tuple[Prometheus, Any],
) -> None:
    prometheus, server = prometheus_and_server
    prometheus.wait_for(lambda: [r["value"][1] for r in prometheus.query('up{job="linlens"}')] == ["1"], "a scrape")

    def counted() -> dict[tuple[str, str], float]:
        rows = prometheus.query('sum by (method, code) (linlens_requests_total{model=~".*"})')
        return {(r["metric"]["method"], r["metric"]["code"]): float(r["value"][1]) for r in rows}

    def requests(ok: int, invalid: int, explain: int, late: int) -> None:
        with Client(server.target, retry=NO_RETRY, timeout=120) as client:
            for _ in range(late):  # a deadline the server cannot meet: a server-side failure on the dashboard
                with pytest.raises(DeadlineExceededError):
                    client.generate("Once upon a time", max_new_tokens=60, ignore_eos=True, timeout=0.3)
            for _ in range(ok):
                assert client.generate("The bridge out of Marin is the", max_new_tokens=2).text == " only one"
            for _ in range(invalid):
                with pytest.raises(InvalidArgumentError):
                    client.generate("", max_new_tokens=2)
            for _ in range(explain):
                client.explain("The bridge out of Marin is the", options=ExplainOptions(top_k=0))

    # A labelled series appears with its first increment, so a rate needs a scrape of it before the increase:
    # one request of each kind first, then the ones the panels should see.
    requests(1, 1, 1, 1)
    first = {
        ("Generate", "OK"): 1.0,
        ("Generate", "INVALID_ARGUMENT"): 1.0,
        ("Generate", "DEADLINE_EXCEEDED"): 1.0,
        ("Explain", "OK"): 1.0,
    }
    prometheus.wait_for(lambda: counted() == first, f"the scraped counters to read {first}")
    requests(2, 1, 1, 1)
    expected = {
        ("Generate", "OK"): 3.0,
        ("Generate", "INVALID_ARGUMENT"): 2.0,
        ("Generate", "DEADLINE_EXCEEDED"): 2.0,
        ("Explain", "OK"): 2.0,
    }
    prometheus.wait_for(lambda: counted() == expected, f"the scraped counters to read {expected}")
    time.sleep(2.5)  # more scrapes of the same values: the rates below are over settled series

    # "Requests per second by method and status": every method and status the test produced, at a positive rate
    rates = {
        (r["metric"]["method"], r["metric"]["code"]): float(r["value"][1])
        for r in prometheus.query(panel_expr("Requests per second by method and status"))
    }
    assert set(rates) == set(expected) and all(v > 0 for v in rates.values()), rates
    assert rates[("Generate", "OK")] > rates[("Generate", "INVALID_ARGUMENT")]  # 2 against 1 in the same window
    # "Server-side error ratio": the missed deadline is 1 of the last 4 Generate calls; INVALID_ARGUMENT is the
    # caller's; Explain had no server-side failure (no series: the panel shows nothing for it)
    rows = prometheus.query(panel_expr("Server-side error ratio"))
    ratio = {r["metric"]["method"]: float(r["value"][1]) for r in rows}
    assert set(ratio) == {"Generate"} and 0.15 < ratio["Generate"] < 0.35, ratio
    # "In flight and queued": nothing left once the calls returned
    inflight = prometheus.query(panel_expr("In flight and queued"))
    assert inflight and all(float(r["value"][1]) == 0 for r in inflight)
    # "Request latency" p95: a finite duration for Generate, within the bucket range the server exports
    (p95,) = [
        r
        for r in prometheus.query(panel_expr("Request latency (p50 / p95 / p99)", 1))
        if r["metric"]["method"] == "Generate"
    ]
    assert 0 < float(p95["value"][1]) <= 600
    # "Loaded models" and "Resident memory"
    (model,) = prometheus.query(panel_expr("Loaded models"))
    assert model["metric"]["model"] == "smollm2-135m" and model["metric"]["family"] == "llama"
    (rss,) = prometheus.query(panel_expr("Resident memory"))
    assert 200 * 2**20 < float(rss["value"][1]) < 20 * 2**30
    # the alert rules were loaded and evaluate without error against the real series
    rules = prometheus.get("/api/v1/rules")["data"]["groups"]
    assert len(rules) == 4 and all(r["health"] == "ok" for g in rules for r in g["rules"])
    firing = [a for a in prometheus.get("/api/v1/alerts")["data"]["alerts"] if a["state"] == "firing"]
    assert firing == [], firing
