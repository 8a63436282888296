"""Running a batch job on Ray: Ray Data reads the input, ``map_batches`` runs the rows on a pool of actors that each
hold one loaded model (in-process, the same request path as the default run), and Ray Data writes the Parquet parts.

Rows of an actor that dies are retried by Ray, not by us: Ray Data gives its pool's actors ``max_restarts=-1`` and
``max_task_retries=-1``, so a dead actor is restarted and its batches run again; a batch's output is written only
once it has been computed whole, so no row is lost or written twice.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, TextIO

from linlens.batch.job import OK, BatchJob, BatchSummary, arrow_schema, process_row
from linlens.batch.table import done_ids, input_files, part_files


class RowExplainer:
    """A Ray actor's callable: loads the job's model once, then turns each batch of input rows into output rows."""

    def __init__(self, job: BatchJob) -> None:
        from linlens.batch.run import inprocess_client

        self.job = job
        self.client = inprocess_client(job)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        records = [process_row(self.job, self.client, row, -1) for row in batch.to_pylist()]
        return pa.Table.from_pylist(records, schema=arrow_schema())


def _dataset(ray_data: Any, source: Any) -> Any:
    if not isinstance(source, (str, Path)):
        return ray_data.from_huggingface(source)
    fmt, files = input_files(source)
    paths = [str(f) for f in files]
    if fmt == "json":
        return ray_data.read_json(paths, lines=True)
    if fmt == "csv":
        return ray_data.read_csv(paths)
    return ray_data.read_parquet(paths)


def ensure_ray(address: str | None, actors: int, cpus_per_actor: float, gpus_per_actor: float) -> float:
    """Connect to the Ray at ``address``, or start a local one sized for the actors (plus one CPU for reading); the
    seconds it took."""
    import ray

    started = time.monotonic()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            cpus = max(os.cpu_count() or 1, math.ceil(actors * cpus_per_actor) + 1)
            gpus = math.ceil(actors * gpus_per_actor) if gpus_per_actor else None
            ray.init(num_cpus=cpus, num_gpus=gpus, log_to_driver=False, include_dashboard=False)
    return time.monotonic() - started


def run_on_ray(
    job: BatchJob,
    *,
    address: str | None = None,
    actors: int = 2,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    progress: TextIO | None = None,
) -> BatchSummary:
    """Run ``job`` on Ray with ``actors`` actors, each taking ``cpus_per_actor`` CPUs and ``gpus_per_actor`` GPUs."""
    import ray.data

    started = time.monotonic()
    ensure_ray(address, actors, cpus_per_actor, gpus_per_actor)
    output = Path(job.output)
    done = done_ids(output)
    before = set(part_files(output))
    dataset = _dataset(ray.data, job.source)
    if "id" not in dataset.columns():
        raise ValueError("on Ray every row needs an 'id' (resuming finds done rows by id)")
    if done:
        dataset = dataset.filter(lambda row: str(row["id"]) not in done)
    results = dataset.map_batches(
        RowExplainer,
        fn_constructor_args=(job,),
        batch_format="pyarrow",
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
    )
    results.write_parquet(str(output), min_rows_per_file=job.part_rows)
    import pyarrow.parquet as pq

    written = 0
    failed = 0
    for part in set(part_files(output)) - before:
        statuses = pq.read_table(part, columns=["status"]).column("status").to_pylist()
        written += len(statuses)
        failed += sum(1 for s in statuses if s != OK)
    summary = BatchSummary(written, failed, len(done), time.monotonic() - started, output)
    if progress is not None:
        progress.write(summary.line() + "\n")
    return summary
