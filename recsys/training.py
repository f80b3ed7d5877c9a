"""Ray Train plumbing shared by the retriever and the ranker.

``fit`` runs a ``TorchTrainer`` whose run name hashes the training inputs, so
re-running with the same inputs resumes from the last checkpoint in storage
(Train v2 restores a run by storage path + name), and ``FailureConfig`` restarts
the worker group from the last checkpoint after a worker error. Inside the loop,
``cache_shard`` / ``restore`` / ``report_epoch`` handle data, resume and the
per-epoch checkpoint (metrics are reported with the checkpoint, so Train v2 keeps
them in ``Result.metrics``). The checkpoint also carries every epoch's metrics so far
(``history``, kept across resumes), which ``history_outputs`` turns into a JSON file and a
loss curve in the run folder: the driver reads it from the final checkpoint in storage, so
it works when workers and driver share no disk.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np

from pipelines import training

STATE_FILE = "state.pt"


def run_name(prefix: str, *parts) -> str:
    """``prefix-<hash of parts>``: same inputs -> same Train run (resume), new inputs -> new run."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return f"{prefix}-{hashlib.sha1(blob).hexdigest()[:10]}"


def param_shapes(model) -> dict:
    """Parameter names and shapes: part of the run name, so a changed model never resumes an old one."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def fit(loop, loop_config: dict, datasets: dict, workers, storage: str, name: str,
        max_failures: int = 0, unsplit: tuple[str, ...] = ()):
    """Run ``loop`` on ``workers.num_workers`` Train workers; returns the Train ``Result``.

    ``storage`` is where Train keeps the run's checkpoints: a local path (in-process Ray or a
    shared mount) or an ``oss://``/``s3://`` URI, resolved by :func:`pipelines.io.train_storage`.
    Datasets named in ``unsplit`` reach every worker whole (e.g. validation on rank 0).
    """
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.io import train_storage

    storage_path, storage_filesystem = train_storage(storage)

    per_worker = {"CPU": workers.num_cpus}
    if workers.num_gpus:
        per_worker["GPU"] = workers.num_gpus
    trainer = TorchTrainer(
        loop, train_loop_config=loop_config, datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[k for k in datasets if k not in unsplit]),
        scaling_config=ScalingConfig(num_workers=workers.num_workers, use_gpu=workers.num_gpus > 0,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    return training.fit(trainer)


def cache_shard(name: str, batch_rows: int = 8192) -> dict[str, np.ndarray]:
    """This worker's shard of dataset ``name`` as in-memory NumPy columns (read once, reused per epoch)."""
    import ray.train

    parts: dict[str, list] = {}
    for batch in ray.train.get_dataset_shard(name).iter_batches(batch_size=batch_rows, batch_format="numpy"):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def batches_per_epoch(rows: int, batch_size: int) -> int:
    """Full batches only, so every DDP worker takes the same number of steps."""
    return max(1, rows // batch_size)


def restore(model, optimizer) -> tuple[int, list[dict]]:
    """Load the last checkpoint (if any) into model/optimizer; returns (next epoch, metrics of the epochs so
    far)."""
    import ray.train
    import torch

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, []
    with ckpt.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
    target = model.module if hasattr(model, "module") else model
    target.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["epoch"] + 1, state.get("history", [])


def report_epoch(model, optimizer, epoch: int, metrics: dict, history: list[dict]) -> None:
    """Report ``metrics`` with a checkpoint (rank 0 writes it; every rank must call this); appends them to
    ``history``, which the checkpoint carries."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    metrics = {**metrics, "epoch": epoch}
    history.append(metrics)
    if ray.train.get_context().get_world_rank() == 0:
        target = model.module if hasattr(model, "module") else model
        with tempfile.TemporaryDirectory() as d:
            torch.save({"model": target.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                        "metrics": metrics, "history": history}, os.path.join(d, STATE_FILE))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics, checkpoint=None)


def load_state(checkpoint) -> dict:
    """The saved dict (model, optimizer, epoch, metrics, history) of a Train checkpoint."""
    import torch

    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)


def history_outputs(out: str, model: str, history: list[dict]) -> dict[str, str]:
    """Write ``<model>_history.json`` (per-epoch metrics) and the loss curve ``<model>_loss.png`` into the
    run folder; their output names (``<model>_history``, ``plot_<model>_loss``)."""
    from pipelines.io import write_json
    from pipelines.report import plot_lines

    epochs = [h["epoch"] + 1 for h in history]
    return {f"{model}_history": write_json(f"{out}/{model}_history.json", history),
            f"plot_{model}_loss": plot_lines(f"{out}/{model}_loss.png",
                                             {"train loss": (epochs, [h["loss"] for h in history])},
                                             xlabel="epoch", ylabel="loss", title=f"{model} training loss")}


def worker_device():
    """The device Ray Train assigned to this worker (CUDA when it has a GPU)."""
    import ray.train.torch

    return ray.train.torch.get_device()
