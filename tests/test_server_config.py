"""Server configuration: the documented precedence (defaults < file < LINLENS_* environment < flags), both file
formats, and errors that name the setting and where the bad value came from. No model is loaded here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from linlens.server.config import (
    ConfigError,
    ServerConfig,
    add_arguments,
    build_config,
    config_from_args,
    load_config,
)
from linlens.server.metrics import DEFAULT_METRICS_PORT


def test_defaults_are_valid_and_match_the_metrics_port() -> None:
    config = build_config([], environ={})
    assert config == ServerConfig()
    assert config.port == 50051 and config.metrics_port == DEFAULT_METRICS_PORT
    assert config.models == ("smollm2-135m",) and config.default_model == "smollm2-135m"
    assert (config.max_concurrent_jobs, config.max_queue) == (1, 16)
    assert config.log_format == "text" and config.log_prompts is False


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "linlens.toml"
    toml.write_text('port = 6000\nmax_queue = 3\nmodels = ["a", "b"]\nlog_format = "json"\ngrace_period_s = 5\n')
    env = {"LINLENS_PORT": "7000", "LINLENS_MAX_QUEUE": "4", "LINLENS_LOG_PROMPTS": "yes", "UNRELATED": "x"}
    config = build_config(["--config", str(toml), "--port", "8000"], environ=env)
    assert config.port == 8000  # flag beats environment beats file
    assert config.max_queue == 4  # environment beats file
    assert config.models == ("a", "b") and config.log_format == "json" and config.grace_period_s == 5.0  # file
    assert config.log_prompts is True
    assert config.metrics_port == DEFAULT_METRICS_PORT  # default


def test_config_file_from_the_environment_yaml_and_server_table(tmp_path: Path) -> None:
    yaml_file = tmp_path / "linlens.yaml"
    yaml_file.write_text("server:\n  models: [smollm2-135m, gemma-3-270m]\n  max_top_k: 5\n")
    config = load_config(environ={"LINLENS_CONFIG": str(yaml_file), "LINLENS_MODELS": "x, y"})
    assert config.max_top_k == 5 and config.models == ("x", "y")
    toml = tmp_path / "t.toml"
    toml.write_text("[server]\nmetrics_port = 0\n")
    assert load_config(toml, environ={}).metrics_port == 0


def test_repeated_model_flags_and_boolean_flags() -> None:
    config = build_config(["--model", "m1", "--model", "m2", "--no-log-prompts", "--no-warmup"], environ={})
    assert config.models == ("m1", "m2") and config.default_model == "m1"
    assert config.log_prompts is False and config.warmup is False


def test_the_cli_can_reuse_the_flags_in_its_own_parser() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_arguments(sub.add_parser("serve"))
    args = parser.parse_args(["serve", "--max-concurrent-jobs", "2", "--log-format", "json"])
    config = config_from_args(args, environ={"LINLENS_MAX_CONCURRENT_JOBS": "9"})
    assert config.max_concurrent_jobs == 2 and config.log_format == "json"


@pytest.mark.parametrize(
    ("environ", "argv", "message"),
    [
        ({"LINLENS_PORT": "eighty"}, [], "port (from environment variable LINLENS_PORT)"),
        ({}, ["--port", "70000"], "port: 70000 is not a TCP port"),
        ({}, ["--max-concurrent-jobs", "0"], "max_concurrent_jobs: must be at least 1"),
        ({}, ["--max-queue", "-1"], "max_queue: must be 0 or more"),
        ({}, ["--log-format", "xml"], "log_format: 'xml' is not one of text, json"),
        ({"LINLENS_LOG_PROMPTS": "maybe"}, [], "expected true or false"),
        ({"LINLENS_MODELS": " , "}, [], "at least one model"),
        ({}, ["--dtype", "int8"], "dtype"),
        ({}, ["--attention", "flash"], "attention: 'flash' is not one of auto, sdpa, eager"),
    ],
)
def test_bad_values_name_the_setting_and_the_source(environ: dict[str, str], argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(argv, environ=environ)


def test_bad_files_are_reported(tmp_path: Path) -> None:
    unknown = tmp_path / "u.toml"
    unknown.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match=r"prot .*unknown setting"):
        load_config(unknown, environ={})
    broken = tmp_path / "b.toml"
    broken.write_text("port = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(broken, environ={})
    with pytest.raises(ConfigError, match=r"config file .*missing"):
        load_config(tmp_path / "missing.toml", environ={})
    mixed = tmp_path / "m.toml"
    mixed.write_text("port = 1\n[server]\nmax_queue = 2\n")
    with pytest.raises(ConfigError, match=r"outside the \[server\] table"):
        load_config(mixed, environ={})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tls_cert_file": "s.crt"}, "tls_cert_file and tls_key_file: give both"),
        ({"tls_client_ca_file": "ca.crt"}, "tls_client_ca_file: mutual TLS needs TLS"),
        ({"max_concurrent_streams": 32, "grpc_threads": 32}, "max_concurrent_streams: 32 must stay below grpc_threads"),
        ({"health_port": 50051}, "health_port: 50051 is the gRPC port"),
        ({"max_request_bytes": 0}, "max_request_bytes: must be at least 1"),
        ({"max_prompt_tokens": -1}, "max_prompt_tokens: must be 0 or more"),
    ],
)
def test_security_and_limit_settings_are_checked(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ={}, overrides=settings)


def test_security_settings_from_the_environment_and_flags() -> None:
    env = {"LINLENS_TLS_CERT_FILE": "/s/tls.crt", "LINLENS_TLS_KEY_FILE": "/s/tls.key", "LINLENS_HEALTH_PORT": "50052"}
    config = build_config(["--auth-token-file", "/s/tokens", "--no-reflection"], environ=env)
    assert config.tls and config.tls_key_file == "/s/tls.key" and config.health_port == 50052
    assert config.auth_token_file == "/s/tokens" and config.reflection is False
    assert ServerConfig().reflection is True and not ServerConfig().tls and ServerConfig().max_prompt_tokens == 0
