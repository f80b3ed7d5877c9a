"""Behaviour cloning with Ray Train: an MLP policy regressed onto the expert's actions.

``python -m embodied.train --dataset <run_dir>/episodes`` trains on a LeRobot v3
dataset with ``TorchTrainer`` (``train.num_workers`` DDP workers, CUDA when a
GPU is assigned), checkpoints every ``train.checkpoint_every`` epochs into
``<run_dir>/checkpoints``, and prints the run-contract JSON line.

The frames are read once on the driver and shared through the object store;
each worker trains on its own slice (rank::world_size). State-vector datasets
are small (1M frames of Reacher are ~50 MB); for bigger ones pass a Ray
Dataset to ``TorchTrainer(datasets=...)`` instead.
"""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import click
import numpy as np
import pyarrow.fs as pafs

from pipelines.cli import exit_with, template_options
from pipelines.io import filesystem_for
from pipelines.io import run_dir as make_run_dir
from pipelines.report import emit, summary

from . import config as config_mod
from .config import TEMPLATE, EmbodiedConfig
from .dataset import read_frames, read_info, vectors
from .rollout import connect_cluster

WEIGHTS_FILE = "policy.pt"


def load_training_arrays(dataset: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(observations, actions, info.json) of a LeRobot v3 dataset."""
    info = read_info(dataset)
    frames = read_frames(dataset, columns=["index", "observation.state", "action"])
    if frames.num_rows == 0:
        raise ValueError(f"dataset {dataset} has no frames")
    return vectors(frames["observation.state"]), vectors(frames["action"]), info


def train_loop(config: dict) -> None:
    """One Ray Train worker: DDP regression of actions on observations, checkpoints from rank 0."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from embodied.policies import build_mlp, mlp_weights

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] + rank)
    obs_all, act_all = ray.get(config["obs"]), ray.get(config["act"])
    device = ray.train.torch.get_device()
    obs = torch.tensor(obs_all[rank::world], device=device)  # a copy: object-store arrays are read-only
    act = torch.tensor(act_all[rank::world], device=device)
    model = build_mlp(obs.shape[1], act.shape[1], config["hidden"], obs_all.mean(0), obs_all.std(0))
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config["epochs"])
    batch = max(1, config["batch_size"] // world)
    steps = max(1, (len(obs_all) // world) // batch)  # the same on every rank: DDP steps in lockstep
    generator = torch.Generator().manual_seed(config["seed"] + rank)
    for epoch in range(1, config["epochs"] + 1):
        order = torch.randperm(len(obs), generator=generator).to(device)
        total = 0.0
        model.train()
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            loss = torch.nn.functional.mse_loss(model(obs[idx]), act[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach().item()
        scheduler.step()
        if epoch % config["checkpoint_every"] and epoch != config["epochs"]:
            continue
        metrics = {"epoch": epoch, "loss": total / steps}
        if rank == 0:
            net = model.module if hasattr(model, "module") else model
            weights = mlp_weights(net, obs.shape[1], act.shape[1], config["hidden"], config["low"], config["high"])
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(weights, Path(tmp) / WEIGHTS_FILE)
                (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def load_weights(checkpoint_dir: str) -> dict:
    """The policy weights saved in a BC checkpoint folder (local path or object-store URI)."""
    import torch

    fs, path = filesystem_for(checkpoint_dir)
    if fs.get_file_info(f"{path}/{WEIGHTS_FILE}").type != pafs.FileType.File:
        raise FileNotFoundError(f"{checkpoint_dir} is not a BC checkpoint (no {WEIGHTS_FILE})")
    with fs.open_input_file(f"{path}/{WEIGHTS_FILE}") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)


def train(cfg: EmbodiedConfig, dataset: str, run_dir: str) -> dict:
    """Fit the BC policy on ``dataset``; return metrics, the checkpoint path and the weights."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .envs import env_facts

    t = cfg.train
    obs, act, info = load_training_arrays(dataset)
    facts = env_facts(info["robot_type"])
    if obs.shape[1] != facts["obs_dim"] or act.shape[1] != facts["act_dim"]:
        raise ValueError(f"dataset {dataset} does not match env {info['robot_type']} "
                         f"(obs {obs.shape[1]} vs {facts['obs_dim']}, action {act.shape[1]} vs {facts['act_dim']})")
    loop_config = {"obs": ray.put(obs), "act": ray.put(act), "hidden": t.hidden, "lr": t.lr,
                   "weight_decay": t.weight_decay, "epochs": t.epochs, "batch_size": t.batch_size,
                   "checkpoint_every": t.checkpoint_every, "seed": t.seed,
                   "low": facts["low"], "high": facts["high"]}
    resources = {"CPU": t.num_cpus, **({"GPU": t.num_gpus} if t.num_gpus else {})}
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.num_gpus > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="bc", storage_path=f"{run_dir}/checkpoints",
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    metrics = {"train_loss": float(result.metrics["loss"]), "train_epochs": int(result.metrics["epoch"]),
               "train_frames": len(obs), "train_workers": t.num_workers}
    return {"metrics": metrics, "checkpoint": result.checkpoint.path,
            "weights": load_weights(result.checkpoint.path)}


@click.command()
@template_options
@click.option("--dataset", default=None, help="LeRobot v3 dataset folder (default: <run-dir>/episodes).")
def main(config, overrides, address, run_dir, dataset):
    """Behaviour cloning on a collected dataset with Ray Train."""
    cfg = config_mod.load(config, overrides)
    if not (dataset or run_dir):
        raise click.UsageError("give --dataset PATH or --run-dir of a collect run")
    dataset = dataset or f"{run_dir}/episodes"
    fs, path = filesystem_for(dataset)
    if fs.get_file_info(f"{path}/meta/info.json").type != pafs.FileType.File:
        raise FileNotFoundError(f"no LeRobot dataset at {dataset} (meta/info.json missing)")
    connect_cluster(cfg, address)
    out = run_dir or make_run_dir(TEMPLATE, root=cfg.run_root)
    result = train(cfg, dataset, out)
    emit(summary(TEMPLATE, "train", out, outputs={"checkpoint": result["checkpoint"]}, metrics=result["metrics"]))


if __name__ == "__main__":
    exit_with(main)
