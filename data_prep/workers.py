"""Run one function over many items (URL list parts, shards) in worker processes or Spark tasks."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context


def run_tasks(function, tasks: list, processes: int, distributor: str = "multiprocessing") -> list:
    """`function` over `tasks`, results in order: as Spark tasks (pyspark: the active session,
    or a local one), in a pool of `processes` spawned processes, or here when there is one
    process or one task. `function` and the tasks must pickle."""
    if not tasks:
        return []
    if distributor == "pyspark":
        from pyspark.sql import SparkSession

        spark = SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
        return spark.sparkContext.parallelize(tasks, len(tasks)).map(function).collect()
    if processes == 1 or len(tasks) == 1:
        return [function(task) for task in tasks]
    with ProcessPoolExecutor(min(processes, len(tasks)), mp_context=get_context("spawn")) as pool:
        return list(pool.map(function, tasks))
