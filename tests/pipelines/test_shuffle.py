"""pipelines.shuffle on the session cluster: keyed partitions keep every row and never split a key."""
import pandas as pd
import pyarrow as pa

from pipelines.shuffle import _split, partition_by, value_counts


def test_split_is_a_stable_hash_of_the_keys():
    table = pa.table({"k": ["a", "b", "c", "a", "d"] * 20, "j": [1, 2] * 50, "v": range(100)})
    parts = _split(table, ["k", "j"], 4)
    assert sum(p.num_rows for p in parts) == 100
    again = _split(table.slice(50), ["k", "j"], 4)  # another block: equal keys go to the same part
    for part, other in zip(parts, again):
        assert set(zip(other["k"].to_pylist(), other["j"].to_pylist())) <= set(
            zip(part["k"].to_pylist(), part["j"].to_pylist()))


def test_partition_by_keeps_every_row_and_each_key_in_one_block(ray_connected):
    import ray

    frame = pd.DataFrame({"card": [f"c{i % 37}" for i in range(3000)], "v": range(3000)})
    ds = ray.data.from_pandas([frame.iloc[i:i + 500] for i in range(0, 3000, 500)])
    parts = partition_by(ds, ["card"], 5)
    blocks = [ray.get(ref) for ref in parts.to_arrow_refs()]
    assert len(blocks) == 5
    assert sorted(v for b in blocks for v in b["v"].to_pylist()) == list(range(3000))
    owner = {}
    for i, block in enumerate(blocks):
        for card in set(block["card"].to_pylist()):
            assert owner.setdefault(card, i) == i, card
    assert len(owner) == 37 and len({*owner.values()}) > 1


def test_value_counts_sums_the_blocks(ray_connected):
    import ray

    frame = pd.DataFrame({"tier": ["low"] * 70 + ["high"] * 20 + ["medium"] * 10})
    ds = ray.data.from_pandas([frame.iloc[i:i + 30] for i in range(0, 100, 30)])
    assert value_counts(ds, "tier") == {"low": 70, "high": 20, "medium": 10}
