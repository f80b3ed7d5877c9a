"""pipelines.shuffle on the session cluster: keyed partitions keep every row and never split a key."""
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.shuffle import _split, key_hash, partition_by, value_counts


def _keys(table: pa.Table) -> set:
    return set(table["k"].to_pylist())


def test_split_puts_each_key_in_one_part_whatever_the_column_type():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 50, 400)
    ints = pa.table({"k": pa.array(keys, pa.int64()), "v": np.arange(400)})
    parts = _split(["k"], 4, ints)
    assert sum(p.num_rows for p in parts) == 400
    assert all(_keys(a).isdisjoint(_keys(b)) for i, a in enumerate(parts) for b in parts[i + 1:])
    assert sum(1 for p in parts if p.num_rows) > 1  # by key, not all in one part
    # another block holding the same keys shuffled, as floats with a null: each key goes to the same part
    floats = pa.table({"k": pa.array(list(rng.permutation(keys).astype(float)) + [None]), "v": np.arange(401)})
    for part, other in zip(parts, _split(["k"], 4, floats)):
        assert {k for k in _keys(other) if k is not None} <= {float(k) for k in _keys(part)}
    as_text = pa.table({"k": pa.array([str(k) for k in keys]).dictionary_encode()})
    assert (key_hash(as_text, ["k"]) == key_hash(ints, ["k"])).all()
    assert _split(["k"], 1, ints, floats.slice(0, 5)).num_rows == 405  # one part: the rows, together


def test_partition_by_keeps_every_row_and_each_key_in_one_block(ray_connected):
    import ray

    frame = pd.DataFrame({"k": [f"c{i % 37}" for i in range(3000)], "v": range(3000)})
    ds = ray.data.from_pandas([frame.iloc[i:i + 500] for i in range(0, 3000, 500)])
    parts = partition_by(ds, ["k"], 5)
    blocks = [ray.get(ref) for ref in parts.to_arrow_refs()]
    assert len(blocks) == 5
    assert sorted(v for b in blocks for v in b["v"].to_pylist()) == list(range(3000))
    owner = {}
    for i, block in enumerate(blocks):
        for card in _keys(block):
            assert owner.setdefault(card, i) == i, card
    assert len(owner) == 37 and len({*owner.values()}) > 1
    one = [ray.get(ref) for ref in partition_by(ds, ["k"], 1).to_arrow_refs()]
    assert len(one) == 1 and one[0].num_rows == 3000
    assert partition_by(ds.filter(lambda r: False), ["k"], 3).count() == 0
    with pytest.raises(ValueError, match="blocks must be >= 1"):
        partition_by(ds, ["k"], 0)


def test_value_counts_sums_the_blocks(ray_connected):
    import ray

    frame = pd.DataFrame({"tier": ["low"] * 70 + ["high"] * 20 + ["medium"] * 9 + [None]})
    ds = ray.data.from_pandas([frame.iloc[i:i + 30] for i in range(0, 100, 30)])
    assert value_counts(ds, "tier") == {"low": 70, "high": 20, "medium": 9, None: 1}
