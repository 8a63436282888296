"""A batch job's settings, how one input row becomes a call, and how its answer becomes one output row.

Shared by every way to run a job (in-process, fleet, Ray), so that they produce the same rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from linlens.contract.options import AttributionTarget, ExplainOptions
from linlens.contract.results import ExplainResult, Explanation, Generation, to_jsonable

#: The status of a row that succeeded (failed rows hold their gRPC status name).
OK = "OK"


@dataclass(frozen=True)
class BatchJob:
    """One batch job: where the rows come from, where the table goes, and one set of options for every row.

    ``source`` is a .jsonl/.json, .csv or .parquet file (or a folder of them), or a ``datasets.Dataset``. Each row
    has one of ``prompt`` (text), ``token_ids`` (a list of ints; in CSV a JSON list) or ``messages`` (a list of
    ``{"role", "content"}``; in CSV a JSON list), an optional ``id`` (default: the row's index; Ray needs it) and
    optional ``target`` / ``contrast`` token ids (one attribution target per row). ``output`` is the folder of the
    Parquet table. ``mode`` "explain" explains the next token; "generate" generates (``max_new_tokens``, greedy) and,
    with ``explain_generation``, explains the first generated token with ``options``.
    """

    source: Any
    output: str | Path
    #: The model to load (registry name, folder or .gguf) in-process and on Ray; a fleet serves its own.
    model: str | None = None
    mode: Literal["explain", "generate"] = "explain"
    options: ExplainOptions = field(default_factory=ExplainOptions)
    max_new_tokens: int = 16
    explain_generation: bool = True
    #: Also write each row's full result as JSON under ``output``/results/ (the table's ``result_file`` column).
    full_results: bool = False
    #: Server limits for in-process and Ray runs (a fleet's servers have their own): 0 keeps the server default.
    max_prompt_tokens: int = 0
    #: Torch threads per model (in-process and each Ray actor); 0 lets torch choose.
    torch_threads: int = 0
    #: Rows per Parquet part file written by in-process and fleet runs (each part is written whole or not at all).
    part_rows: int = 8

    def __post_init__(self) -> None:
        if self.mode not in ("explain", "generate"):
            raise ValueError(f"mode must be 'explain' or 'generate', not {self.mode!r}")
        if self.part_rows < 1:
            raise ValueError("part_rows must be at least 1")


@dataclass(frozen=True)
class BatchSummary:
    """What a finished run did: rows written now, of them failed, rows skipped as already done, rows/s."""

    done: int
    failed: int
    skipped: int
    seconds: float
    output: Path

    @property
    def rows_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.done} rows done ({self.failed} failed), {self.skipped} already done; "
            f"{self.rows_per_second:.2f} rows/s over {self.seconds:.1f} s -> {self.output}"
        )


def arrow_schema() -> Any:
    """The output table's pyarrow schema (the same for every way to run, so that the parts make one table)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("status", pa.string()),
            ("message", pa.string()),
            ("model", pa.string()),
            ("text", pa.string()),
            ("explained_token_id", pa.int64()),
            ("explained_token", pa.string()),
            ("explained_probability", pa.float64()),
            ("relative_error_vs_model", pa.float64()),
            ("relative_error_vs_detached", pa.float64()),
            ("max_abs_logit_error", pa.float64()),
            ("input_tokens", pa.list_(pa.string())),
            ("attribution_label", pa.string()),
            ("attributions", pa.list_(pa.float64())),
            ("singular_values", pa.list_(pa.float64())),
            ("singular_tokens", pa.list_(pa.list_(pa.string()))),
            ("method", pa.string()),
            ("vjp_count", pa.int64()),
            ("jvp_count", pa.int64()),
            ("forward_ms", pa.float64()),
            ("jacobian_ms", pa.float64()),
            ("attribution_ms", pa.float64()),
            ("svd_ms", pa.float64()),
            ("server_ms", pa.float64()),
            ("row_ms", pa.float64()),
            ("result_file", pa.string()),
        ]
    )


def row_id(row: Mapping[str, Any], index: int) -> str:
    value = row.get("id")
    return str(index) if value is None else str(value)


def _listish(value: Any) -> Any:
    """A list column read from CSV arrives as its JSON text."""
    if isinstance(value, str):
        return json.loads(value)
    return value


def call_arguments(job: BatchJob, row: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The prompt and keyword arguments of ``client.explain`` / ``client.generate`` for ``row``.

    Raises ValueError for a row that holds no input or more than one.
    """
    prompt = row.get("prompt")
    token_ids = row.get("token_ids")
    messages = row.get("messages")
    given = [name for name, value in (("prompt", prompt), ("token_ids", token_ids), ("messages", messages)) if value]
    if prompt == "" and not given:
        raise ValueError("the prompt is empty")
    if len(given) != 1:
        raise ValueError(f"a row needs exactly one of prompt, token_ids or messages (got {', '.join(given) or 'none'})")
    kwargs: dict[str, Any] = {}
    if token_ids:
        kwargs["token_ids"] = [int(i) for i in _listish(token_ids)]
    if messages:
        kwargs["messages"] = [{"role": m["role"], "content": m["content"]} for m in _listish(messages)]
    options = job.options
    target = row.get("target")
    if target is not None:
        contrast = row.get("contrast")
        targets = (AttributionTarget(int(target), None if contrast is None else int(contrast)),)
        options = dataclasses.replace(options, targets=targets)
    if job.mode == "explain":
        kwargs["options"] = options
    else:
        kwargs["max_new_tokens"] = job.max_new_tokens
        kwargs["explain"] = options if job.explain_generation else None
    return (str(prompt) if prompt else None), kwargs


def empty_record(rid: str) -> dict[str, Any]:
    return {name: None for name in arrow_schema().names} | {"id": rid}


def _explanation_fields(record: dict[str, Any], explanation: Explanation) -> None:
    record["explained_token_id"] = explanation.explained.token_id
    record["explained_token"] = explanation.explained.text
    record["explained_probability"] = float(explanation.explained.probability)
    if explanation.reconstruction is not None:
        record["relative_error_vs_model"] = float(explanation.reconstruction.relative_error_vs_model)
        record["relative_error_vs_detached"] = float(explanation.reconstruction.relative_error_vs_detached)
        record["max_abs_logit_error"] = float(explanation.reconstruction.max_abs_logit_error)
    record["input_tokens"] = list(explanation.input_tokens)
    if explanation.attributions:
        first = explanation.attributions[0]
        record["attribution_label"] = first.label
        record["attributions"] = [float(x) for x in first.per_token]
    if explanation.spectra:
        spectrum = explanation.spectra[-1]
        record["singular_values"] = [float(c.value) for c in spectrum.components]
        record["singular_tokens"] = [[t.text for t in c.left_tokens] for c in spectrum.components]
    record["method"] = None if explanation.method is None else explanation.method.value
    record["vjp_count"] = explanation.vjp_count
    record["jvp_count"] = explanation.jvp_count
    record["forward_ms"] = float(explanation.timings.forward_ms)
    record["jacobian_ms"] = float(explanation.timings.jacobian_ms)
    record["attribution_ms"] = float(explanation.timings.attribution_ms)
    record["svd_ms"] = float(explanation.timings.svd_ms)


def result_record(rid: str, result: ExplainResult | Generation) -> dict[str, Any]:
    """The output row of a successful call."""
    record = empty_record(rid)
    record["status"] = OK
    record["message"] = ""
    record["model"] = result.model
    if isinstance(result, ExplainResult):
        record["text"] = result.explanation.predicted.text
        _explanation_fields(record, result.explanation)
        record["server_ms"] = float(result.explanation.timings.total_ms)
    else:
        record["text"] = result.text
        if result.explanations:
            _explanation_fields(record, result.explanations[0])
        record["server_ms"] = float(result.timings.total_ms)
    return record


def failure_record(rid: str, error: BaseException) -> dict[str, Any]:
    """The output row of a failed call: the gRPC status name and the message."""
    from linlens.client.errors import LinlensError

    record = empty_record(rid)
    if isinstance(error, LinlensError):
        record["status"] = error.code.name
        record["message"] = error.details
    elif isinstance(error, (ValueError, TypeError)):
        record["status"] = "INVALID_ARGUMENT"
        record["message"] = str(error)
    else:
        record["status"] = "INTERNAL"
        record["message"] = f"{type(error).__name__}: {error}"
    return record


def result_file_name(rid: str) -> str:
    """Where a row's full result goes, relative to the output folder (ids need not be valid file names)."""
    return f"results/{hashlib.sha256(rid.encode()).hexdigest()[:24]}.json"


def process_row(job: BatchJob, client: Any, row: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Run one row through ``client`` (InProcessClient or Client) and return its output row; never raises for a
    failed row."""
    rid = row_id(row, index)
    started = time.perf_counter()
    try:
        prompt, kwargs = call_arguments(job, row)
        call: Callable[..., ExplainResult | Generation] = client.explain if job.mode == "explain" else client.generate
        result = call(prompt, **kwargs)
        record = result_record(rid, result)
        if job.full_results:
            name = result_file_name(rid)
            path = Path(job.output) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(to_jsonable(result)))
            tmp.replace(path)
            record["result_file"] = name
    except Exception as error:  # one bad row never stops the job
        record = failure_record(rid, error)
    record["row_ms"] = (time.perf_counter() - started) * 1000.0
    return record
