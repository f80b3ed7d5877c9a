"""Keyed partitions and per-value counts of Ray Datasets, without Ray Data's shuffle operators.

Why: Ray 2.60 runs a keyed ``Dataset.repartition(n, keys=...)`` and a ``groupby`` as SHUFFLE_V2 map
and reduce tasks in two worker pools of their own (runtime_env variables ``RAY_DATA_SHUFFLE_MAP_WORKER``
and ``RAY_DATA_SHUFFLE_REDUCE_WORKER``), so each shuffle starts worker processes besides the ones the
Dataset's other tasks use, and the raylet soon kills them again (idle workers beyond one per CPU); a
``groupby`` without ``num_partitions`` also runs 200 reduce tasks (``default_hash_shuffle_parallelism``).
On 2 cores, riskcontrol's small run (6,000 rows, in-process Ray): the two keyed repartitions 6-11 s,
the tier ``groupby().count()`` 8-12 s (4 s with 8 partitions, 1-2 s with HASH_SHUFFLE's actors); the
same partitions as plain tasks in the job's own worker pool (:func:`partition_by`) 1-2 s, the counts
summed from per-block counts (:func:`value_counts`) 0.1 s. The sort strategies cannot partition by key.

The price: :func:`partition_by` computes its partitions before anything downstream runs. Where an actor
pool consumes them (Ray Data's actors hold their CPUs while they wait), a node lost with some partitions
deadlocks: rebuilding them needs CPUs the waiting actors hold (riskcontrol's scoring of ``--input``,
tests/riskcontrol/test_reliability.py, hung). There ``streaming=True`` keeps Ray Data's keyed repartition,
which makes the partitions as the actors take them.
"""
from __future__ import annotations

import pandas as pd
import pyarrow as pa


def _split(table: pa.Table, keys: list[str], blocks: int):
    """``table``'s rows in ``blocks`` parts by a stable hash of the ``keys`` columns (the same in every process)."""
    part = pd.util.hash_pandas_object(table.select(keys).to_pandas(), index=False).to_numpy() % blocks
    parts = [table.filter(pa.array(part == i)) for i in range(blocks)]
    return parts if blocks > 1 else parts[0]


def _concat(*tables: pa.Table) -> pa.Table:
    return pa.concat_tables(tables, promote_options="default")


def partition_by(ds, keys: list[str], blocks: int, num_cpus: float = 1, streaming: bool = False):
    """``ds`` as a Dataset of ``blocks`` blocks where the rows with equal ``keys`` values share one block,
    like ``ds.repartition(blocks, keys=keys)`` (see the module doc for why not that, and for
    ``streaming``, which is that). Runs ``ds`` now; a map over the result with ``batch_size=None`` sees
    each block whole."""
    import ray

    if streaming:
        return ds.repartition(blocks, keys=keys)
    refs = ds.to_arrow_refs()
    if not refs:
        return ds
    split = ray.remote(_split).options(num_returns=blocks, num_cpus=num_cpus)
    parts = [split.remote(ref, keys, blocks) for ref in refs]
    if blocks == 1:
        parts = [[p] for p in parts]
    concat = ray.remote(_concat).options(num_cpus=num_cpus)
    return ray.data.from_arrow_refs([concat.remote(*(p[i] for p in parts)) for i in range(blocks)])


def _counts(table: pa.Table, column: str) -> pa.Table:
    import pyarrow.compute as pc

    found = pc.value_counts(table.column(column))
    return pa.table({"value": found.field("values"), "count": found.field("counts")})


def value_counts(ds, column: str) -> dict:
    """Rows per value of ``column``: each block counted where it is, the counts summed here (no shuffle)."""
    total: dict = {}
    for row in ds.map_batches(_counts, batch_format="pyarrow", batch_size=None,
                              fn_kwargs={"column": column}).take_all():
        total[row["value"]] = total.get(row["value"], 0) + int(row["count"])
    return total
