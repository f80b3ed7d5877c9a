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

The price: :func:`partition_by` computes its partitions before anything downstream runs, and holds the
input, its split parts and the partitions in the object store at once (about 3x the data; Ray spills
beyond the store). Lost partitions are rebuilt from lineage (plain tasks), which no test shows with a
node killed mid-way. Where an actor pool consumes them (Ray Data's actors hold their CPUs while they
wait), a node lost with some partitions deadlocks: rebuilding them needs CPUs the waiting actors hold
(riskcontrol's scoring of ``--input``, tests/riskcontrol/test_reliability.py, hung). There
``streaming=True`` keeps Ray Data's keyed repartition, which makes the partitions as the actors take them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# at most this many split tasks: each makes one object per partition, so with many input blocks and
# many partitions (riskcontrol's cluster config: 256) one task per input block would make 10^5+ objects
MAX_SPLIT_TASKS = 32


def key_hash(table: pa.Table, keys: list[str]) -> np.ndarray:
    """A stable hash (uint64, the same in every process) of each row's ``keys`` values, compared as text:
    1 hashes alike as int32, int64 (with or without nulls), float64 or a dictionary of strings, so a key
    never splits across blocks whose column types differ."""
    text = {}
    for key in keys:
        column = table.column(key)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        text[key] = pc.cast(column, pa.large_string()).to_numpy(zero_copy_only=False)
    return pd.util.hash_pandas_object(pd.DataFrame(text), index=False).to_numpy()


def _split(keys: list[str], blocks: int, *tables: pa.Table):
    """The rows of ``tables`` in ``blocks`` parts by :func:`key_hash` (one sort, then slices)."""
    # an empty block may lack the columns (a Dataset filtered to nothing): it adds no rows anyway
    table = _concat(*([t for t in tables if t.num_rows] or tables[:1]))
    if not table.num_rows:
        parts = [table] * blocks
    else:
        part = key_hash(table, keys) % blocks
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(blocks + 1))
        ordered = table.take(order)
        parts = [ordered.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(blocks)]
    return parts if blocks > 1 else parts[0]  # Ray's num_returns=1 returns the one value itself


def _concat(*tables: pa.Table) -> pa.Table:
    return pa.concat_tables(tables, promote_options="permissive")


def partition_by(ds, keys: list[str], blocks: int, num_cpus: float = 1, streaming: bool = False):
    """``ds`` as a Dataset of ``blocks`` blocks where the rows with equal ``keys`` values share one block,
    like ``ds.repartition(blocks, keys=keys)`` (see the module doc for why not that, and for
    ``streaming``, which is that). Runs ``ds`` now; a map over the result with ``batch_size=None`` sees
    each block whole."""
    import ray

    if blocks < 1:
        raise ValueError(f"partition_by: blocks must be >= 1, got {blocks}")
    if streaming:
        return ds.repartition(blocks, keys=keys)
    refs = ds.to_arrow_refs()
    if not refs:
        return ds
    tasks = min(len(refs), MAX_SPLIT_TASKS)
    split = ray.remote(_split).options(num_returns=blocks, num_cpus=num_cpus)
    parts = [split.remote(keys, blocks, *refs[i::tasks]) for i in range(tasks)]
    if blocks == 1:
        parts = [[p] for p in parts]
    concat = ray.remote(_concat).options(num_cpus=num_cpus)
    return ray.data.from_arrow_refs([concat.remote(*(p[i] for p in parts)) for i in range(blocks)])


def _counts(table: pa.Table, column: str) -> pa.Table:
    found = pc.value_counts(table.column(column))
    return pa.table({"value": found.field("values"), "count": found.field("counts")})


def value_counts(ds, column: str) -> dict:
    """Rows per value of ``column``: each block counted where it is, the counts summed here (no shuffle).
    Null values count under ``None``."""
    total: dict = {}
    for row in ds.map_batches(_counts, batch_format="pyarrow", batch_size=None,
                              fn_kwargs={"column": column}).take_all():
        total[row["value"]] = total.get(row["value"], 0) + int(row["count"])
    return total
