"""Reading the input rows and the output table's part files (which rows are done; writing a part whole or not at
all)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from linlens.batch.job import arrow_schema

_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def input_files(source: str | Path) -> tuple[str, list[Path]]:
    """The format and files of a file or folder source."""
    path = Path(source)
    files = sorted(p for p in path.iterdir() if p.suffix in _SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no .jsonl, .csv or .parquet files in {path}")
    formats = {_SUFFIXES.get(p.suffix) for p in files}
    if len(formats) != 1 or None in formats:
        raise ValueError(f"cannot read {path}: use .jsonl, .json, .csv or .parquet files of one kind")
    return str(formats.pop()), files


def read_rows(source: Any) -> list[dict[str, Any]]:
    """Every input row as a dict (a ``datasets.Dataset`` or a file/folder path)."""
    if not isinstance(source, (str, Path)):
        return [dict(row) for row in source]
    import pyarrow as pa

    fmt, files = input_files(source)
    tables = []
    for file in files:
        if fmt == "json":
            import pyarrow.json as pj

            tables.append(pj.read_json(file))
        elif fmt == "csv":
            import pyarrow.csv as pc

            tables.append(pc.read_csv(file))
        else:
            import pyarrow.parquet as pq

            tables.append(pq.read_table(file))
    rows: list[dict[str, Any]] = pa.concat_tables(tables, promote_options="default").to_pylist()
    return rows


def part_files(output: Path) -> list[Path]:
    return sorted(output.glob("*.parquet")) if output.is_dir() else []


def done_ids(output: Path) -> set[str]:
    """The ids of the rows the table already holds. A part file that cannot be read (a run killed while writing it)
    is removed: its rows are not done."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for part in part_files(output):
        try:
            column = pq.read_table(part, columns=["id"]).column("id").to_pylist()
        except Exception:
            part.unlink(missing_ok=True)
            continue
        ids.update(str(i) for i in column)
    return ids


def write_part(output: Path, records: Sequence[dict[str, Any]]) -> Path:
    """Write ``records`` as one new part file, atomically (a temporary name, then a rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    output.mkdir(parents=True, exist_ok=True)
    path = output / f"part-{uuid.uuid4().hex}.parquet"
    tmp = output / f".{path.name}.tmp"
    pq.write_table(pa.Table.from_pylist(list(records), schema=arrow_schema()), tmp)
    os.replace(tmp, path)
    return path


def read_output(output: str | Path) -> list[dict[str, Any]]:
    """Every row of an output table, as dicts (for tests and small tables; use pyarrow or pandas for big ones).

    A part file that cannot be read is skipped: a run killed while writing it (Ray Data writes under the final name)
    left it incomplete, its rows are not done, and the next run removes it (:func:`done_ids`)."""
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for part in part_files(Path(output)):
        try:
            table = pq.read_table(part)
        except Exception:
            continue
        rows.extend(table.to_pylist())
    return rows


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
