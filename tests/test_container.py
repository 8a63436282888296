"""Build deploy/Dockerfile for real with podman, run it, and talk to it over gRPC (opt-in: it takes minutes).

    LINLENS_CONTAINER_TESTS=1 pytest -s tests/test_container.py

No Docker engine or container registry is needed: the base image is made locally with debootstrap (Debian bookworm
with its python3.11 and venv, the same Python the python:3.11-slim default carries), the build runs air-gapped from
deploy/wheelhouse/ (filled by deploy/wheelhouse.sh when empty) with ``--isolation chroot``, and the container runs
with runc on the host network, as measured in /work/shared/notes/containers.md. Knobs:

- LINLENS_CONTAINER_BASE: use this image as BASE instead of the debootstrap one (e.g. python:3.11-slim where a
  registry is reachable).
- LINLENS_CONTAINER_PIP_OFFLINE=0: let pip inside the build use the index too (the CA bundle in SSL_CERT_FILE is
  then handed over as the `ca` build secret).
- TORCH_INDEX_URL: passed to deploy/wheelhouse.sh when the wheelhouse has to be filled.

The test starts the container, waits for gRPC health SERVING, checks the image's own HEALTHCHECK command, the
non-root user, one explained request through the Python client, /metrics, and a clean exit on SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from prometheus_client.parser import text_string_to_metric_families

from linlens.client import Client, ExplainOptions, HealthStatus, LinlensError
from linlens.contract import ExplainMethod, PositionSelection

#: An explanation that is still running a second after it starts on this machine: every position's full Jacobian
#: (the default, the last position on its own graph, can finish within that second).
SLOW_EXPLANATION = ExplainOptions(top_k=2, method=ExplainMethod.FULL, positions=PositionSelection.ALL)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("LINLENS_CONTAINER_TESTS") != "1", reason="container tests are opt-in: LINLENS_CONTAINER_TESTS=1"
    ),
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed (apt-get install podman runc)"),
    pytest.mark.timeout(1800),
]

ROOT = Path(__file__).resolve().parents[1]
LOCAL_BASE = "localhost/linlens-base:bookworm-py311"
IMAGE = "localhost/linlens:container-test"
#: Global podman flags that work on these machines (no systemd, cgroup v1/v2 without a manager).
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
MODEL = "smollm2-135m"


def run(
    cmd: list[str], timeout: float, check: bool = True, cwd: Path | None = None, stdin: IO[bytes] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command; with ``check`` a failure fails the test with the command's output."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd, stdin=stdin)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ensure_local_base() -> str:
    """A Debian bookworm base with python3.11 and venv, made with debootstrap unless it exists already."""
    if run([*PODMAN, "image", "exists", LOCAL_BASE], 60, check=False).returncode == 0:
        return LOCAL_BASE
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        pytest.skip("no base image: set LINLENS_CONTAINER_BASE, or run as root with debootstrap installed")
    with tempfile.TemporaryDirectory(prefix="linlens-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(rootfs),
                "http://deb.debian.org/debian",
            ],
            900,
        )
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run([*PODMAN, "import", "-", LOCAL_BASE], 600, stdin=tar.stdout)
        tar.wait(timeout=60)
    return LOCAL_BASE


def ensure_wheelhouse() -> None:
    if any((ROOT / "deploy" / "wheelhouse").glob("torch-*.whl")):
        return
    run(["sh", "deploy/wheelhouse.sh"], 1200, cwd=ROOT)


@pytest.fixture(scope="module")
def image() -> str:
    base = os.environ.get("LINLENS_CONTAINER_BASE") or ensure_local_base()
    offline = os.environ.get("LINLENS_CONTAINER_PIP_OFFLINE", "1")
    if offline == "1":
        ensure_wheelhouse()
    cmd = [
        "podman",
        "build",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--format",
        "docker",  # HEALTHCHECK and STOPSIGNAL are Docker-format image fields
        "-f",
        "deploy/Dockerfile",
        "--build-arg",
        f"BASE={base}",
        "--build-arg",
        f"PIP_OFFLINE={offline}",
        "-t",
        IMAGE,
    ]
    ca = os.environ.get("SSL_CERT_FILE")
    if ca and Path(ca).is_file():
        cmd += ["--secret", f"id=ca,src={ca}"]
    started = time.monotonic()
    run([*cmd, "."], 1500, cwd=ROOT)
    print(f"\nimage built in {time.monotonic() - started:.0f} s (base {base}, PIP_OFFLINE={offline})")
    return IMAGE


def test_image_metadata(image: str) -> None:
    fmt = "{{.Config.User}}|{{.Config.StopSignal}}|{{json .Config.Entrypoint}}|{{json .Config.Healthcheck.Test}}"
    inspected = run([*PODMAN, "image", "inspect", "--format", fmt, image], 60).stdout.strip()
    user, stop_signal, entrypoint, healthcheck = inspected.split("|")
    assert user == "10001:10001"
    assert stop_signal == "SIGTERM"
    assert entrypoint == '["/opt/venv/bin/python","-m","linlens.server"]'
    assert "linlens-healthcheck" in healthcheck
    size = int(run([*PODMAN, "image", "inspect", "--format", "{{.Size}}", image], 60).stdout.strip())
    print(f"\nimage size {size / 1e9:.2f} GB")


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[tuple[str, int, int]]:
    name = f"linlens-test-{os.getpid()}"
    grpc_port, metrics_port = free_port(), free_port()
    run(
        [
            *PODMAN,
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            "host",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            # The Kubernetes pod's security context: read-only root, writable /tmp and ~/.cache, no capabilities.
            "--read-only",
            "--tmpfs",
            "/tmp",
            "--tmpfs",
            "/home/linlens/.cache",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "-e",
            "LINLENS_HOST=127.0.0.1",
            "-e",
            f"LINLENS_PORT={grpc_port}",
            "-e",
            f"LINLENS_METRICS_PORT={metrics_port}",
            image,
        ],
        120,
    )
    try:
        yield name, grpc_port, metrics_port
    finally:
        logs = run([*PODMAN, "logs", name], 60, check=False)
        print(f"\n--- container log (tail) ---\n{(logs.stdout + logs.stderr)[-3000:]}")
        run([*PODMAN, "rm", "--force", "--time", "5", name], 120, check=False)


def wait_serving(name: str, grpc_port: int, timeout: float) -> float:
    started = time.monotonic()
    with Client(f"127.0.0.1:{grpc_port}", timeout=5) as client:
        while time.monotonic() - started < timeout:
            state = run([*PODMAN, "inspect", "--format", "{{.State.Status}}", name], 60).stdout.strip()
            assert state == "running", f"container is {state}"
            try:
                if client.health() == HealthStatus.SERVING:
                    return time.monotonic() - started
            except LinlensError:
                pass
            time.sleep(1)
    pytest.fail(f"not SERVING after {timeout} s")


def test_container_serves_an_explanation_and_metrics_then_stops_on_sigterm(container: tuple[str, int, int]) -> None:
    name, grpc_port, metrics_port = container
    ready_after = wait_serving(name, grpc_port, timeout=300)
    print(f"\nSERVING {ready_after:.1f} s after `podman run`")

    # The image's own HEALTHCHECK command, run the way Docker runs it, and the user it runs as.
    assert run([*PODMAN, "exec", name, "python", "/usr/local/bin/linlens-healthcheck"], 60).returncode == 0
    assert run([*PODMAN, "exec", name, "id", "-u"], 60).stdout.strip() == "10001"

    with Client(f"127.0.0.1:{grpc_port}", timeout=600) as client:
        started = time.monotonic()
        result = client.explain("The bridge out of Marin is the", options=ExplainOptions(top_k=2, tokens_per_vector=3))
        print(f"explained request answered in {time.monotonic() - started:.1f} s")
    assert result.model == MODEL
    assert result.explanation.predicted.text == " only"
    reconstruction = result.explanation.reconstruction
    assert reconstruction is not None and reconstruction.relative_error_vs_model < 1e-5
    assert result.explanation.spectra and result.explanation.attributions

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    ok = (("code", "OK"), ("method", "Explain"), ("model", MODEL))
    assert samples[("linlens_requests_total", ok)] == 1
    assert samples[("linlens_reconstruction_relative_error_count", (("model", MODEL),))] == 1
    load_seconds = samples[("linlens_model_load_duration_seconds", (("model", MODEL),))]
    print(f"model loaded in {load_seconds:.1f} s inside the container (converted at build time)")
    assert load_seconds < 60, "the model was converted again instead of coming from the image's cache"
    rss = samples[("linlens_process_resident_memory_bytes", ())]
    print(f"resident memory after the explanation: {rss / 2**30:.2f} GiB")

    # SIGTERM while an explanation is in flight: the server (PID 1 through the exec-form entrypoint) drains, the
    # call still succeeds, and the process exits 0 well within the stop timeout.
    outcome: list[object] = []

    def explain_during_shutdown() -> None:
        with Client(f"127.0.0.1:{grpc_port}", timeout=600, retry=None) as c:
            try:
                outcome.append(c.explain("The bridge out of Marin is the", options=SLOW_EXPLANATION))
            except LinlensError as exc:
                outcome.append(exc)

    worker = threading.Thread(target=explain_during_shutdown)
    worker.start()
    time.sleep(1.0)  # the call is admitted and running (this explanation takes several seconds here)
    started = time.monotonic()
    run([*PODMAN, "stop", "--time", "40", name], 120)
    stopped_after = time.monotonic() - started
    worker.join(timeout=120)
    print(f"stopped {stopped_after:.1f} s after SIGTERM, with one explanation in flight")
    exit_code = run([*PODMAN, "inspect", "--format", "{{.State.ExitCode}}", name], 60).stdout.strip()
    assert exit_code == "0", "SIGTERM must lead to a drain and a clean exit, not a kill"
    assert stopped_after < 40, "podman had to kill the server at the stop timeout"
    assert len(outcome) == 1
    logs = run([*PODMAN, "logs", name], 60)
    assert "SIGTERM received" in logs.stdout + logs.stderr
    assert "1 call(s) in flight" in logs.stdout + logs.stderr
    # The image logs JSON lines only (log_format = "json", progress bars off), so a log collector can parse all.
    lines = [ln for ln in (logs.stdout + logs.stderr).splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]
    access = [r for r in records if r.get("logger") == "linlens.access"]
    assert len(access) == 2 and all(r["method"] == "Explain" for r in access)
    assert access[0]["code"] == "OK"
    # The in-flight call finishes within the grace period (25 s), normally; on a starved CPU it can be cancelled
    # at the end of the grace period instead. Either way the client got exactly what the server logged.
    if access[1]["code"] == "OK":
        assert not isinstance(outcome[0], LinlensError), outcome
    else:
        print(f"in-flight call ended {access[1]['code']} after the grace period (CPU starved)")
        assert isinstance(outcome[0], LinlensError) and outcome[0].code.name == access[1]["code"], outcome
    assert not any("prompt" in r for r in access), "prompt text must stay out of the logs by default"
