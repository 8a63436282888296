"""Process logging: human-readable text or JSON lines, and the one-line-per-request access log.

Every request produces exactly one record on the ``linlens.access`` logger, written when the call ends, with the
request id, method, model, gRPC status code and durations. Successful polls (GetModel, ListModels: what a client
waiting for a model to load asks every second) are written at DEBUG, so that they do not bury the lines that matter;
health checks never reach the access log. Prompt text appears only when the operator turned on
``log_prompts``: prompts can contain personal data, and logs are usually kept longer and read by more people than
the requests themselves.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

ACCESS_LOGGER = "linlens.access"

#: LogRecord attributes that belong to the logging machinery, not to the event; JSON output leaves them out.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a caller attached with ``extra={"fields": {...}}``."""
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, Mapping) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, then the record's structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_fields(record))
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key != "fields" and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``; values with spaces are quoted so lines stay parseable."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _fields(record)
        if extra:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in extra.items())
        return line


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def setup_logging(log_format: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
    """Send every log record of the process to ``stream`` (stderr) in the chosen format, replacing old handlers."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # transformers and friends are chatty at INFO; their warnings still come through
    for noisy in ("transformers", "accelerate", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    if log_format == "json" or not handler.stream.isatty():
        # A progress bar redrawn with carriage returns is noise in a log file or collector; the loader logs its own
        # progress lines (linlens.models.progress) instead.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def quiet_progress_bars(stream: TextIO | None = None) -> None:
    """Turn off third-party progress bars when the log does not go to a terminal.

    A bar redrawn with carriage returns is noise in a log file or collector; the loader logs its own progress lines
    instead (linlens.models.progress). tqdm reads TQDM_DISABLE when it is first imported, so the server's entry
    points call this before torch and transformers load.
    """
    if not (stream or sys.stderr).isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


#: Methods a client polls (readiness, listing); their successful calls are logged at DEBUG.
POLLS = frozenset({"GetModel", "ListModels"})


def log_request(fields: Mapping[str, Any]) -> None:
    """Write the access-log line of one finished request (a successful poll at DEBUG, see the module docstring)."""
    poll = fields.get("method") in POLLS and fields.get("code") == "OK"
    logging.getLogger(ACCESS_LOGGER).log(
        logging.DEBUG if poll else logging.INFO, "request", extra={"fields": dict(fields)}
    )


__all__ = ["ACCESS_LOGGER", "JsonFormatter", "TextFormatter", "log_request", "quiet_progress_bars", "setup_logging"]
