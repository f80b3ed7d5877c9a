"""Behaviour cloning with Ray Train: an MLP policy regressed onto the expert's actions.

The ``train`` step (``python -m embodied train --run-dir DIR``) trains on the run
folder's LeRobot v3 dataset (output ``episodes``) with ``TorchTrainer``
(``train.num_workers`` DDP workers, CUDA when a GPU is assigned), checkpoints every
``train.checkpoint_every`` epochs into ``<run_dir>/checkpoints``, and keeps the
final checkpoint as ``<run_dir>/policy`` (output ``policy``, what ``evaluate`` reads).
Every report carries ``loss_history`` (the training loss of each epoch so far, averaged over
the workers), so it travels with the checkpoints to the run folder (``policy/metrics.json``)
and the driver plots it as ``learning_curve.png`` (output ``plot_loss``).
The run folder may be local or ``oss://``/``s3://``: Ray Train gets the storage path with
its filesystem (:func:`pipelines.io.train_storage`), so rank 0's checkpoint (saved in a
temporary folder on its own node) is uploaded there, and the policy loads from the URI.

The frames are read once on the driver and shared through the object store;
each worker trains on its own slice (rank::world_size). State-vector datasets
are small (1M frames of Reacher are ~50 MB); for bigger ones pass a Ray
Dataset to ``TorchTrainer(datasets=...)`` instead.
"""
from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from pipelines import training
from pipelines.config import redact
from pipelines.io import (
    exists,
    filesystem_for,
    join,
    read_bytes,
    reject_ratio_failure,
    rejects_table,
    train_storage,
    write_json,
    write_table,
)
from pipelines.report import plot_lines
from pipelines.template import Run, StepResult

from .config import EmbodiedConfig
from .dataset import read_frames, read_info, vectors

WEIGHTS_FILE = "policy.pt"
TRAINED_ON = "dataset.json"  # beside the weights: the dataset, its env (or none) and the held-out episodes


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
    history = []  # mean training loss per epoch over every worker's batches (the learning curve)
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
        epoch_loss = torch.tensor([total / steps], device=device)
        if world > 1:
            torch.distributed.all_reduce(epoch_loss)
        history.append(epoch_loss.item() / world)
        if epoch % config["checkpoint_every"] and epoch != config["epochs"]:
            continue
        metrics = {"epoch": epoch, "loss": history[-1], "loss_history": list(history)}
        net = model.module if hasattr(model, "module") else model
        report_epoch(metrics, mlp_weights(net, obs.shape[1], act.shape[1], config["hidden"], config["low"],
                                          config["high"]) if rank == 0 else None)


def report_epoch(metrics: dict, weights: dict | None) -> None:
    """Report one epoch's metrics from a Ray Train worker; with ``weights`` (rank 0's) also a checkpoint of
    them (saved with torch as ``WEIGHTS_FILE``) and the metrics."""
    import ray.train
    import torch

    if weights is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(weights, Path(tmp) / WEIGHTS_FILE)
        (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def load_weights(checkpoint_dir: str) -> dict:
    """The policy weights saved in a BC checkpoint folder (local path or object-store URI)."""
    import torch

    try:
        data = read_bytes(join(checkpoint_dir, WEIGHTS_FILE))
    except FileNotFoundError:
        raise FileNotFoundError(f"{checkpoint_dir} is not a BC checkpoint (no {WEIGHTS_FILE})") from None
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def keep_checkpoint(checkpoint, dest: str) -> str:
    """Copy a Ray Train checkpoint folder to ``dest`` (a fixed place in the run folder); ``dest``."""
    fs, path = filesystem_for(dest)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(checkpoint.path, path, source_filesystem=checkpoint.filesystem, destination_filesystem=fs)
    return dest


def train(cfg: EmbodiedConfig, dataset: str, run_dir: str) -> dict:
    """Fit the BC policy on our own ``dataset`` (its ``robot_type`` is the env it was collected in); return
    metrics and the final Ray Train checkpoint."""
    from .envs import env_facts

    obs, act, info = load_training_arrays(dataset)
    facts = env_facts(info["robot_type"])
    if obs.shape[1] != facts["obs_dim"] or act.shape[1] != facts["act_dim"]:
        raise ValueError(f"dataset {dataset} does not match env {info['robot_type']} "
                         f"(obs {obs.shape[1]} vs {facts['obs_dim']}, action {act.shape[1]} vs {facts['act_dim']})")
    return fit(cfg, obs, act, facts["low"], facts["high"], run_dir)


def train_with_ray(train_loop, loop_config: dict, section, run_dir: str, name: str, datasets: dict | None = None):
    """Run ``train_loop`` with ``TorchTrainer`` on ``section.num_workers`` workers (``num_cpus``/``num_gpus``
    each: GPUs mean ``use_gpu``), checkpoints under the run's ``checkpoints/<name>``; the Result, which
    holds a checkpoint (else a RuntimeError)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": section.num_cpus, **({"GPU": section.num_gpus} if section.num_gpus else {})}
    storage_path, storage_filesystem = train_storage(join(run_dir, "checkpoints"))
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_config, datasets=datasets,
        scaling_config=ScalingConfig(num_workers=section.num_workers, use_gpu=section.num_gpus > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = training.fit(trainer)
    if result.checkpoint is None:
        raise RuntimeError(f"{name} training finished without a checkpoint")
    return result


def fit(cfg: EmbodiedConfig, obs: np.ndarray, act: np.ndarray, low, high, run_dir: str) -> dict:
    """Behaviour cloning of ``act`` on ``obs`` with ``TorchTrainer`` (actions clipped to ``low``..``high``
    when the policy acts); metrics, the final checkpoint and the loss history."""
    import ray

    t = cfg.train
    loop_config = {"obs": ray.put(obs), "act": ray.put(act), "hidden": t.hidden, "lr": t.lr,
                   "weight_decay": t.weight_decay, "epochs": t.epochs, "batch_size": t.batch_size,
                   "checkpoint_every": t.checkpoint_every, "seed": t.seed,
                   "low": list(map(float, low)), "high": list(map(float, high))}
    result = train_with_ray(train_loop, loop_config, t, run_dir, "bc")
    metrics = {"train_loss": float(result.metrics["loss"]), "train_epochs": int(result.metrics["epoch"]),
               "train_frames": len(obs), "train_workers": t.num_workers}
    return {"metrics": metrics, "checkpoint": result.checkpoint,
            "loss_history": result.metrics["loss_history"]}


def plot_learning_curve(uri: str, loss_history: list[float], env_id: str) -> str:
    """The training loss per epoch (PNG at ``uri``)."""
    epochs = list(range(1, len(loss_history) + 1))
    return plot_lines(uri, {"train loss": (epochs, loss_history)}, xlabel="epoch",
                      ylabel="MSE on actions", title=f"{env_id}: behaviour cloning")


def run(cfg: EmbodiedConfig, run: Run) -> StepResult:
    """The train step: BC on the run's ``episodes`` (or on the user's dataset, ``input.path``); the final
    checkpoint becomes output ``policy``, with ``dataset.json`` saying what it was trained on."""
    if cfg.input.path:
        return train_on_input(cfg, run)
    dataset = run.input("episodes")
    if not exists(join(dataset, "meta", "info.json")):
        raise FileNotFoundError(f"no LeRobot dataset at {dataset} (meta/info.json missing)")
    result = train(cfg, dataset, run.dir)
    curve = plot_learning_curve(run.path("learning_curve.png"), result["loss_history"], cfg.env.id)
    policy = keep_checkpoint(result["checkpoint"], run.path("policy"))
    write_json(join(policy, TRAINED_ON), {"source": "collect", "dataset": dataset,
                                          "env": read_info(dataset)["robot_type"]})
    outputs = {"policy": policy, "plot_loss": curve}
    return StepResult(outputs, result["metrics"])


def train_on_input(cfg: EmbodiedConfig, run: Run) -> StepResult:
    """BC on the user's LeRobot v3 dataset (``input.path``), read where it is: state/action sizes from its
    ``meta/info.json``, ``input.holdout`` of its episodes held out, unusable episodes to ``rejects``."""
    from .envs import env_facts
    from .inputs import describe, load_frames, split_episodes

    spec = describe(cfg)
    frames = load_frames(spec)
    write_table(rejects_table(frames.rejects), run.path("rejects"))
    usable = np.unique(frames.episode[frames.good])
    failure = reject_ratio_failure(len(frames.rejects), len(usable) + len(frames.rejects), cfg.input.max_reject_ratio,
                                   "episodes", "input.max_reject_ratio", run.path("rejects"))
    outputs = {"rejects": run.path("rejects"), "episodes": spec.dataset}
    counts = {"episodes": len(usable), "rejected_episodes": len(frames.rejects)}
    if failure:
        return StepResult(outputs, counts, rejects=len(frames.rejects), failure=failure)
    fitted, held = split_episodes(frames.episode[frames.good], cfg.input.holdout, cfg.train.seed)
    mask = frames.good & np.isin(frames.episode, fitted)
    obs, act = frames.obs[mask], frames.act[mask]
    if spec.env:
        facts = env_facts(spec.env)
        low, high = facts["low"], facts["high"]
    else:  # no simulator: the policy acts within the range of the dataset's actions
        low, high = act.min(axis=0), act.max(axis=0)
    print(f"[embodied] dataset {redact(spec.dataset)}: {len(fitted)} training and {len(held)} held-out episodes, "
          f"state {spec.obs_dim} ({spec.state}), action {spec.act_dim} ({spec.action}); "
          f"{'simulator ' + spec.env if spec.env else 'offline evaluation only'} ({spec.env_reason})",
          file=sys.stderr, flush=True)
    result = fit(cfg, obs, act, low, high, run.dir)
    spec.heldout_episodes = [int(k) for k in held]
    spec.rejected_episodes = [int(r["episode_index"]) for r in frames.rejects]
    spec.mean_action = act.mean(axis=0).astype(float).tolist()
    policy = keep_checkpoint(result["checkpoint"], run.path("policy"))
    write_json(join(policy, TRAINED_ON), spec.as_json())
    title = spec.env or str(spec.robot_type or "your dataset")
    outputs.update(policy=policy, plot_loss=plot_learning_curve(run.path("learning_curve.png"),
                                                                result["loss_history"], title))
    metrics = {**result["metrics"], **counts, "train_episodes": len(fitted), "heldout_episodes": len(held)}
    return StepResult(outputs, metrics, rejects=len(frames.rejects))


if __name__ == "__main__":
    from .template import TEMPLATE

    TEMPLATE.step_alias("train")
