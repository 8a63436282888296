"""TLS, mutual TLS and bearer tokens against real servers on localhost, with certificates made in the test.

Every refusal is checked from both sides: the client's error (status and message) and the server's own record (one
access-log line, a counted request), and no log line of the process ever holds a token or a prompt.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from certs import CertificateAuthority
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from linlens.cli.main import main as cli
from linlens.client import (
    NO_RETRY,
    Client,
    HealthStatus,
    UnauthenticatedError,
    UnavailableError,
)
from linlens.server.auth import TokenFile, TokenFileError, bearer_token, new_token, token_digest
from linlens.server.logs import ACCESS_LOGGER

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "The bridge out of Marin is the"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA with a server and a client certificate, and a second CA (with its own client) the server does not
    trust; files on disk for the server, bytes for the clients."""
    folder = tmp_path_factory.mktemp("pki")
    ca, other = CertificateAuthority(), CertificateAuthority("another CA")
    server_cert, server_key = ca.issue("localhost", server=True).write(folder, "server")
    client = ca.issue("linlens-client", server=False)
    stranger = other.issue("stranger", server=False)
    (folder / "ca.crt").write_bytes(ca.pem)
    return {
        "ca": ca.pem,
        "other_ca": other.pem,
        "ca_file": str(folder / "ca.crt"),
        "cert_file": str(server_cert),
        "key_file": str(server_key),
        "client": client,
        "stranger": stranger,
        "folder": folder,
    }


def tls_target(server: Any) -> str:
    return f"127.0.0.1:{server.port}"  # the certificate names 127.0.0.1 (and localhost)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record of the process, at every level."""
    caplog.set_level(logging.DEBUG)
    yield caplog


def access_records(caplog: pytest.LogCaptureFixture, request_id: str) -> list[dict[str, Any]]:
    return [
        dict(r.fields)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == ACCESS_LOGGER and r.fields["request_id"] == request_id  # type: ignore[attr-defined]
    ]


def wait_for_record(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    end = time.monotonic() + 10
    while not (found := access_records(caplog, request_id)):
        assert time.monotonic() < end, f"no access-log line for {request_id}"
        time.sleep(0.02)
    time.sleep(0.1)  # a second line would have arrived by now
    found = access_records(caplog, request_id)
    assert len(found) == 1, found
    return found[0]


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')} {r.exc_text or ''}" for r in caplog.records)


# --- TLS ---------------------------------------------------------------------------------------------------------


def test_tls_serves_encrypted_calls_and_refuses_plaintext_and_untrusted_clients(
    make_server: Callable[..., Any], pki: dict[str, Any]
) -> None:
    server = make_server(tls_cert_file=pki["cert_file"], tls_key_file=pki["key_file"], health_port=0)
    target = tls_target(server)
    with Client(target, root_certificates=pki["ca"], retry=NO_RETRY, timeout=60) as client:
        assert client.generate(PROMPT, max_new_tokens=1).text == " only"
        assert client.health() is HealthStatus.SERVING
    with Client(target, retry=NO_RETRY, timeout=5) as plain, pytest.raises(UnavailableError):
        plain.list_models()  # a plaintext client cannot even complete HTTP/2 with a TLS port
    wrong = Client(target, root_certificates=pki["other_ca"], retry=NO_RETRY, timeout=5)
    with wrong, pytest.raises(UnavailableError):
        wrong.list_models()  # the server's certificate is not signed by a CA this client trusts


def test_a_renewed_certificate_is_served_without_a_restart(make_server: Callable[..., Any], tmp_path: Path) -> None:
    old_ca, new_ca = CertificateAuthority("old CA"), CertificateAuthority("new CA")
    cert_file, key_file = old_ca.issue("localhost", server=True).write(tmp_path, "server")
    server = make_server(tls_cert_file=str(cert_file), tls_key_file=str(key_file))
    target = tls_target(server)
    with Client(target, root_certificates=old_ca.pem, retry=NO_RETRY, timeout=60) as client:
        assert client.list_models()
    # renew: write the new pair beside the old one, then move it into place (what cert-manager and certbot do)
    renewed = tmp_path / "renewed"
    renewed.mkdir()
    new_cert, new_key = new_ca.issue("localhost", server=True).write(renewed, "server")
    os.replace(new_key, key_file)
    os.replace(new_cert, cert_file)
    with Client(target, root_certificates=new_ca.pem, retry=NO_RETRY, timeout=60) as client:
        assert client.list_models()  # a new connection gets the renewed certificate
    stale = Client(target, root_certificates=old_ca.pem, retry=NO_RETRY, timeout=5)
    with stale, pytest.raises(UnavailableError):
        stale.list_models()  # the old certificate is no longer served


def test_mutual_tls_requires_a_client_certificate_from_the_configured_ca(
    make_server: Callable[..., Any], pki: dict[str, Any]
) -> None:
    server = make_server(
        tls_cert_file=pki["cert_file"], tls_key_file=pki["key_file"], tls_client_ca_file=pki["ca_file"]
    )
    target = tls_target(server)
    client_cert = pki["client"]
    with Client(
        target,
        root_certificates=pki["ca"],
        private_key=client_cert.key,
        certificate_chain=client_cert.cert,
        retry=NO_RETRY,
        timeout=60,
    ) as client:
        assert client.generate(PROMPT, max_new_tokens=1).text == " only"
    anonymous = Client(target, root_certificates=pki["ca"], retry=NO_RETRY, timeout=5)
    with anonymous, pytest.raises(UnavailableError):
        anonymous.list_models()
    stranger = pki["stranger"]
    with (
        Client(
            target,
            root_certificates=pki["ca"],
            private_key=stranger.key,
            certificate_chain=stranger.cert,
            retry=NO_RETRY,
            timeout=5,
        ) as impostor,
        pytest.raises(UnavailableError),
    ):
        impostor.list_models()


def test_health_only_port_answers_plaintext_probes_while_the_main_port_needs_tls(
    make_server: Callable[..., Any], pki: dict[str, Any]
) -> None:
    from conftest import free_port

    server = make_server(
        tls_cert_file=pki["cert_file"],
        tls_key_file=pki["key_file"],
        tls_client_ca_file=pki["ca_file"],
        health_port=free_port(),
    )
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reply = health.Check(health_pb2.HealthCheckRequest(service="linlens.v1.LinlensService"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # nothing but health on that port
        call = channel.unary_unary("/linlens.v1.LinlensService/ListModels")
        with pytest.raises(grpc.RpcError) as caught:
            call(b"", timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    server.stop()
    # the health port follows the drain like the main one, then closes
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)


def test_missing_certificate_files_stop_start_up_with_the_setting_named(tmp_path: Path) -> None:
    from conftest import server_config

    from linlens.server.app import serve

    config = server_config(tls_cert_file=str(tmp_path / "nope.crt"), tls_key_file=str(tmp_path / "nope.key"))
    assert serve(config, install_signal_handlers=False) == 1


# --- tokens ------------------------------------------------------------------------------------------------------


@pytest.fixture
def token_server(make_server: Callable[..., Any], tmp_path: Path) -> tuple[Any, str, Path]:
    """A server that requires tokens: (server, an accepted token, the token file)."""
    token = new_token()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# accepted API tokens, SHA-256\n{token_digest(token)} ci-robot\n\n{token_digest('x' * 40)}\n")
    return make_server(auth_token_file=str(tokens)), token, tokens


def test_tokens_missing_wrong_and_valid(
    token_server: tuple[Any, str, Path], logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, token, _ = token_server
    monkeypatch.delenv("LINLENS_API_KEY", raising=False)
    with Client(server.target, retry=NO_RETRY, timeout=60) as nobody:
        with pytest.raises(UnauthenticatedError, match=r"needs an API token.*Bearer") as caught:
            nobody.generate(PROMPT, max_new_tokens=1, metadata={"x-request-id": "auth-missing"})
        assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
        # health stays open for probes and load balancers
        assert nobody.health() is HealthStatus.SERVING
    wrong_token = "not-" + token
    with Client(server.target, api_key=wrong_token, retry=NO_RETRY, timeout=60) as wrong:
        with pytest.raises(UnauthenticatedError, match="not accepted"):
            wrong.explain(PROMPT, metadata={"x-request-id": "auth-wrong"})
        with pytest.raises(UnauthenticatedError):
            list(wrong.generate_stream(PROMPT, max_new_tokens=2, metadata={"x-request-id": "auth-stream"}))
    with Client(server.target, api_key=token, retry=NO_RETRY, timeout=60) as valid:
        assert valid.generate(PROMPT, max_new_tokens=1, metadata={"x-request-id": "auth-ok"}).text == " only"
    monkeypatch.setenv("LINLENS_API_KEY", token)  # what OpenAI-style SDK users expect
    with Client(server.target, retry=NO_RETRY, timeout=60) as from_env:
        assert [m.name for m in from_env.list_models()] == ["smollm2-135m"]

    # the server's side: one access-log line per refused call, counted, naming the caller only by label
    for request_id in ("auth-missing", "auth-wrong", "auth-stream"):
        assert wait_for_record(logs, request_id)["code"] == "UNAUTHENTICATED"
    ok = wait_for_record(logs, "auth-ok")
    assert ok["code"] == "OK" and ok["client"] == "ci-robot"
    scrape = {
        (s.labels["method"], s.labels["code"]): s.value
        for family in server.metrics.registry.collect()
        if family.name == "linlens_requests"
        for s in family.samples
        if s.name == "linlens_requests_total"
    }
    assert scrape[("Generate", "UNAUTHENTICATED")] == 1 and scrape[("Explain", "UNAUTHENTICATED")] == 1
    assert scrape[("GenerateStream", "UNAUTHENTICATED")] == 1
    # neither the token (right or wrong) nor the prompt reaches any log line of the process
    text = everything_logged(logs)
    assert token not in text and wrong_token not in text and PROMPT not in text
    assert token_digest(token) not in text


def test_reflection_needs_a_token_and_can_be_switched_off(
    token_server: tuple[Any, str, Path], make_server: Callable[..., Any]
) -> None:
    server, token, _ = token_server
    request = reflection_pb2.ServerReflectionRequest(list_services="")

    def list_services(target: str, metadata: tuple[tuple[str, str], ...] = ()) -> list[str]:
        with grpc.insecure_channel(target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10, metadata=metadata))
            return [s.name for s in reply.list_services_response.service]

    with pytest.raises(grpc.RpcError) as caught:
        list_services(server.target)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "linlens.v1.LinlensService" in list_services(server.target, (("authorization", f"Bearer {token}"),))
    closed = make_server(reflection=False)
    with pytest.raises(grpc.RpcError) as caught:
        list_services(closed.target)
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_token_file_is_reread_when_it_changes_and_a_bad_line_is_refused(
    token_server: tuple[Any, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, token, tokens = token_server
    monkeypatch.setattr(TokenFile, "RECHECK_S", 0.0)
    rotated = new_token()
    tokens.write_text(f"{token_digest(rotated)} rotated\n")
    os.utime(tokens, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))  # a changed mtime even on coarse clocks
    with Client(server.target, api_key=token, retry=NO_RETRY, timeout=60) as old, pytest.raises(UnauthenticatedError):
        old.list_models()
    with Client(server.target, api_key=rotated, retry=NO_RETRY, timeout=60) as new:
        assert new.list_models()
    tokens.write_text(f"{rotated}\n")  # a plain token pasted by mistake: refused, the last good set is kept
    os.utime(tokens, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
    with Client(server.target, api_key=rotated, retry=NO_RETRY, timeout=60) as new:
        assert new.list_models()
    with pytest.raises(TokenFileError, match="line 1: not a SHA-256 hex digest") as caught:
        TokenFile(tokens)
    assert rotated not in str(caught.value)


def test_bearer_token_parsing() -> None:
    assert bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert bearer_token((("authorization", "bearer   abc  "),)) == "abc"
    assert bearer_token((("authorization", "Basic abc"),)) == ""  # present but not a bearer token: refused
    assert bearer_token((("x-other", "Bearer abc"),)) is None
    assert bearer_token(None) is None


def test_cli_passes_the_token_on(
    token_server: tuple[Any, str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, token, _ = token_server
    monkeypatch.delenv("LINLENS_API_KEY", raising=False)
    assert cli(["models", "--server", server.target, "--timeout", "30"]) == 1
    assert "needs an API token" in capsys.readouterr().err
    assert cli(["models", "--server", server.target, "--api-key", token, "--timeout", "30"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out
    monkeypatch.setenv("LINLENS_API_KEY", token)
    assert cli(["wait", "--server", server.target, "--timeout", "30"]) == 0
    assert cli(["generate", PROMPT, "--server", server.target, "--max-new-tokens", "1", "--no-stream"]) == 0
    assert "only" in capsys.readouterr().out


def test_cli_speaks_mutual_tls(make_server: Callable[..., Any], pki: dict[str, Any], capsys: Any) -> None:
    server = make_server(
        tls_cert_file=pki["cert_file"], tls_key_file=pki["key_file"], tls_client_ca_file=pki["ca_file"]
    )
    folder: Path = pki["folder"]
    cert, key = pki["client"].write(folder, "cli-client")
    common = ["models", "--server", tls_target(server), "--ca-cert", pki["ca_file"], "--timeout", "4"]
    assert cli([*common, "--client-cert", str(cert), "--client-key", str(key)]) == 0
    assert "smollm2-135m" in capsys.readouterr().out
    assert cli(common) == 1  # no client certificate: the handshake fails
    said = capsys.readouterr().err
    assert f"no linlens server answers at {tls_target(server)}" in said and "last error" in said
    assert "--client-cert/--client-key" in said
