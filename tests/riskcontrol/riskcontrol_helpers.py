"""Shared by the riskcontrol tests: small seeded transactions and an in-process model on them."""
import pyarrow as pa

from pipelines.io import join, write_table
from riskcontrol.config import RiskConfig
from riskcontrol.data import generate_shard
from riskcontrol.features import features_frame
from riskcontrol.train import run_training


def small_model(out: str, train: dict | None = None, **data):
    """Transactions and features Parquet folders under ``out`` (local folder or ``oss://``) plus
    ``out/model`` (``train``: TrainConfig overrides); (frame, features)."""
    out = str(out)
    cfg = RiskConfig(data={"shards": 1, **data}, train=train or {})
    frame = generate_shard(cfg.data, 0)
    write_table(pa.Table.from_pandas(frame.drop(columns=["date"]), preserve_index=False), join(out, "transactions"))
    feats = features_frame(frame)
    write_table(pa.Table.from_pandas(feats, preserve_index=False), join(out, "features"))
    run_training(cfg, join(out, "features"), out, num_workers=0)
    return frame, feats
