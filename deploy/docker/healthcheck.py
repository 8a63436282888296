"""Container health check through the gRPC health service (grpc.health.v1), for Docker's HEALTHCHECK.

grpc_health_probe is a Go binary that is not on PyPI; the image already has grpcio and grpcio-health-checking, so
this small script does the same job: exit 0 when the server answers SERVING, 1 otherwise (NOT_SERVING while models
load or while draining after SIGTERM, or no answer at all). It imports no torch, so it is cheap to run every few
seconds.

Usage: linlens-healthcheck [HOST:PORT] [SERVICE]
The target defaults to 127.0.0.1 and the server's plaintext health-only port when it has one (``health_port``, the
one to ask when the gRPC port speaks TLS), else its gRPC port; each read from LINLENS_HEALTH_PORT / LINLENS_PORT,
else the config file named by LINLENS_CONFIG, else 50051. SERVICE defaults to "" (the whole server);
"linlens.v1.LinlensService" asks for the service specifically.
"""

from __future__ import annotations

import os
import sys
import tomllib

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_PORT = 50051


def setting(name: str) -> int:
    """An integer setting of the server in this container, by the server's own precedence (env over file); 0 when
    it is not set."""
    if os.environ.get(f"LINLENS_{name.upper()}"):
        return int(os.environ[f"LINLENS_{name.upper()}"])
    path = os.environ.get("LINLENS_CONFIG")
    if path and path.endswith(".toml"):
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError):
            return 0
        table = data.get("server", data)
        if isinstance(table, dict) and isinstance(table.get(name), int):
            return int(table[name])
    return 0


def configured_port() -> int:
    """The port to ask: the health-only port when the server has one, else its gRPC port."""
    return setting("health_port") or setting("port") or DEFAULT_PORT


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else f"127.0.0.1:{configured_port()}"
    service = argv[2] if len(argv) > 2 else ""
    timeout = float(os.environ.get("LINLENS_HEALTHCHECK_TIMEOUT", "3"))
    try:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        print(f"unhealthy: {target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target} {service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
