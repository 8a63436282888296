"""Explain or generate over a whole dataset: ``run_batch(BatchJob(...))`` or ``linlens batch``.

Rows come from JSONL, CSV or Parquet files or a Hugging Face ``datasets`` dataset; the results go to a Parquet table
(a folder of part files), one row per input row, failed rows included with their status. Three ways to run the same
job: in-process (the default), a fleet of linlens servers (``servers``), or Ray (``ray``). See docs/batch.md.

Nothing heavy is imported until it is used: ``import linlens.batch`` needs neither pyarrow nor Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from linlens.batch.job import BatchJob, BatchSummary
    from linlens.batch.run import run_batch

__all__ = ["BatchJob", "BatchSummary", "run_batch"]


def __getattr__(name: str) -> Any:
    if name in ("BatchJob", "BatchSummary"):
        from linlens.batch import job

        return getattr(job, name)
    if name == "run_batch":
        from linlens.batch.run import run_batch

        return run_batch
    raise AttributeError(f"module 'linlens.batch' has no attribute {name!r}")
