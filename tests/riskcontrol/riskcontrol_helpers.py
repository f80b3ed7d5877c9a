"""Shared by the riskcontrol tests: small seeded transactions and an in-process model on them."""
from pathlib import Path

from riskcontrol.config import RiskConfig
from riskcontrol.data import generate_shard
from riskcontrol.features import features_frame
from riskcontrol.train import run_training


def small_model(out: Path, **data):
    """Transactions and features Parquet folders in ``out`` plus ``out/model``; (frame, features)."""
    cfg = RiskConfig(data={"shards": 1, **data})
    frame = generate_shard(cfg.data, 0)
    (out / "transactions").mkdir()
    frame.drop(columns=["date"]).to_parquet(out / "transactions" / "part-0.parquet")
    feats = features_frame(frame)
    (out / "features").mkdir()
    feats.to_parquet(out / "features" / "part-0.parquet")
    run_training(cfg, str(out / "features"), str(out), num_workers=0)
    return frame, feats
