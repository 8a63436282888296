"""deploy/k8s/batch: the fleet Job (and its NetworkPolicy) validate strictly with kubernetes-validate; the KubeRay
RayJob validates against deploy/schemas/rayjob-v1.schema.json, its pod templates strictly as core/v1 PodTemplates;
both run `linlens batch` with flags the CLI accepts. checkov covers these files in tests/test_deploy.py (-d deploy)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from linlens.cli.main import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
BATCH = DEPLOY / "k8s" / "batch"
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((BATCH / name).read_text()) if d is not None]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_fleet_job_validates_strictly(version: str) -> None:
    objects = docs("job-fleet.yaml")
    assert {d["kind"] for d in objects} == {"Job", "NetworkPolicy"}
    for doc in objects:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rayjob_validates_against_its_schema_and_pod_templates_strictly(version: str) -> None:
    schema = json.loads((DEPLOY / "schemas" / "rayjob-v1.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    (job,) = docs("rayjob.yaml")
    validator.validate(job)
    broken = json.loads(json.dumps(job))
    broken["spec"]["shutdownAfterJobFinish"] = True
    assert not validator.is_valid(broken), "the schema must reject misspelt fields"
    cluster = job["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(pod_template, version, strict=True)


def test_both_run_linlens_batch_with_flags_it_accepts() -> None:
    (job,) = [d for d in docs("job-fleet.yaml") if d["kind"] == "Job"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    fleet = container["command"][1:] + container["args"]
    (rayjob,) = docs("rayjob.yaml")
    on_ray = shlex.split(rayjob["spec"]["entrypoint"])[1:]
    assert job["spec"]["template"]["metadata"]["labels"]["linlens.dev/client"] == "true"
    for argv in (fleet, on_ray):
        args = build_parser().parse_args(argv)
        assert args.command == "batch"
    assert build_parser().parse_args(fleet).server == ["linlens-headless.linlens.svc.cluster.local:50051"]
    assert build_parser().parse_args(on_ray).ray == "auto"
