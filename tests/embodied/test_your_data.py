"""Your own data: behaviour cloning on a LeRobot v3 dataset the template did not write.

The fixture ``fixtures/reacher_lerobot`` was written by the ``lerobot`` package's own writer
(``fixtures/make_lerobot_fixture.py``, lerobot 0.4.4; see ``fixtures/README.md``). The checks of a
dataset run before any cluster work; the end-to-end runs use the session cluster and read the dataset
from its object store, as a user's ``oss://`` prefix.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embodied.config import load
from embodied.dataset import vectors
from embodied.inputs import FRAMES, describe, known_env, load_frames, offline_metrics, split_episodes
from embodied.template import TEMPLATE
from pipelines.input import InputError, schema_markdown
from pipelines.io import exists, join, read_json, read_table, upload_dir
from pipelines.testing import local_run_traces

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "reacher_lerobot"
DATA = "data/chunk-000/file-000.parquet"
SMALL_TRAIN = ["--set", "train.epochs=40", "--set", "train.hidden=[64,64]", "--set", "train.batch_size=64",
               "--set", "train.checkpoint_every=40"]


def user_copy(tmp_path: Path, rename_state: str | None = None, nan_episodes=(), info_edit=None) -> Path:
    """A copy of the fixture as a user might have it: the state feature renamed, non-finite actions in
    some episodes, ``meta/info.json`` edited."""
    root = tmp_path / "dataset"
    shutil.copytree(FIXTURE, root)
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    table = pq.read_table(root / DATA)
    if rename_state:
        info["features"][rename_state] = info["features"].pop("observation.state")
        table = table.rename_columns([rename_state if c == "observation.state" else c for c in table.column_names])
    if nan_episodes:
        act = vectors(table["action"]).copy()
        hit = np.isin(table["episode_index"].to_numpy(), nan_episodes) & (table["frame_index"].to_numpy() == 7)
        act[hit, 1] = np.nan
        column = pa.FixedSizeListArray.from_arrays(pa.array(act.reshape(-1)), act.shape[1])
        table = table.set_column(table.column_names.index("action"), "action", column)
    if info_edit:
        info_edit(info)
    info_path.write_text(json.dumps(info))
    pq.write_table(table, root / DATA)
    return root


def cfg_for(path, *overrides):
    return load(None, [f"input.path={path}", *overrides])


# ----------------------------------------------------------------- no Ray
def test_the_lerobot_written_fixture_is_small_and_described_from_its_info_json():
    size = sum(f.stat().st_size for f in FIXTURE.rglob("*") if f.is_file())
    assert size < 1_000_000, size
    spec = describe(cfg_for(FIXTURE))
    assert (spec.state, spec.action, spec.obs_dim, spec.act_dim) == ("observation.state", "action", 10, 2)
    assert spec.total_episodes == 31 and spec.index == "index" and spec.action_names == ["torque_shoulder", "torque_elbow"]
    assert spec.env == "Reacher-v5" and "robot_type" in spec.env_reason
    frames = load_frames(spec)  # episode 17 has a sensor dropout (a NaN state): rejected, with the frame
    assert frames.obs.shape == (1550, 10) and frames.good.sum() == 1500
    assert [(r["id"], r["reason"]) for r in frames.rejects] == [
        ("episode-17", "frame 20: observation.state: a value is not finite")]
    docs = (Path(__file__).resolve().parents[2] / "docs" / "embodied.md").read_text()
    assert schema_markdown(FRAMES) in docs  # the guide's table is the schema in code


def test_not_a_lerobot_dataset_is_one_line_before_any_cluster_work(tmp_path, capsys, monkeypatch):
    import pipelines.connect

    def no_cluster(*args, **kwargs):
        raise AssertionError("connected to Ray")

    monkeypatch.setattr(pipelines.connect, "connect", no_cluster)
    frames_only = tmp_path / "frames"  # a plain Parquet folder of frames: no meta/info.json
    frames_only.mkdir()
    pq.write_table(pq.read_table(FIXTURE / DATA), frames_only / "part-0.parquet")
    assert TEMPLATE.main(["--input", str(frames_only)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"error: input.path {frames_only} is not a LeRobot v3 dataset: no meta/info.json "
                   f"({frames_only}/meta/info.json missing)")]
    # a named feature that is not there: one line naming it, the file and how to map another
    assert TEMPLATE.main(["--input", str(FIXTURE), "--set", "input.columns.state=observation.joints"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{FIXTURE}/meta/info.json: no feature 'observation.joints'" in err[0], err
    # collect has nothing to do on a user's dataset
    assert TEMPLATE.main(["collect", "--input", str(FIXTURE)]) == 2
    assert "nothing to collect" in capsys.readouterr().err


@pytest.mark.parametrize(("edit", "message"), [
    (lambda i: i.update(codebase_version="v2.1"), "codebase_version v2.1, need v3.x"),
    (lambda i: i["features"]["action"].update(shape=[3, 96, 96]), "feature 'action' has shape [3, 96, 96]"),
    (lambda i: i["features"]["observation.state"].update(dtype="video"), "has dtype 'video'"),
    (lambda i: i.update(total_episodes=1), "total_episodes 1: need at least 2"),
])
def test_a_dataset_that_cannot_be_cloned_names_the_field_and_the_file(tmp_path, edit, message):
    root = user_copy(tmp_path, info_edit=edit)
    with pytest.raises(InputError, match=re.escape(message)) as err:
        describe(cfg_for(root))
    assert str(err.value).startswith(f"{root}/meta/info.json: ") and "\n" not in str(err.value)


def test_the_simulator_is_used_only_for_a_known_env_with_the_same_sizes():
    assert known_env({"robot_type": "Reacher-v5"}, 10, 2, None) == ("Reacher-v5", "robot_type Reacher-v5")
    env, why = known_env({"robot_type": "so100"}, 6, 6, None)
    assert env is None and "'so100' is not a simulator env" in why
    env, why = known_env({"robot_type": "Reacher-v5"}, 12, 2, None)  # same name, other robot: offline only
    assert env is None and "sizes 10/2, the dataset 12/2" in why
    assert known_env({"robot_type": None}, 10, 2, "Reacher-v5") == ("Reacher-v5", "input.env Reacher-v5")
    assert known_env({"robot_type": "Reacher-v5"}, 10, 2, "none")[0] is None
    with pytest.raises(InputError, match="not a simulator env"):
        known_env({}, 10, 2, "CartPole-v1")


def test_mapped_features_and_bad_episodes_become_rejects(tmp_path):
    root = user_copy(tmp_path, rename_state="observation.joints", nan_episodes=[4, 11])
    spec = describe(cfg_for(root, "input.columns.state=observation.joints"))
    assert spec.state == "observation.joints" and spec.obs_dim == 10
    frames = load_frames(spec)
    assert [r["id"] for r in frames.rejects] == ["episode-4", "episode-11", "episode-17"]
    assert all(r["stage"] == "input" for r in frames.rejects)
    assert frames.rejects[0]["reason"] == "frame 7: action: a value is not finite"
    assert frames.rejects[2]["reason"] == "frame 20: observation.joints: a value is not finite"
    assert frames.good.sum() == 28 * 50 and not np.isin(frames.episode[frames.good], [4, 11, 17]).any()
    fitted, held = split_episodes(frames.episode[frames.good], 0.1, seed=0)
    assert len(held) == 3 and not set(held) & set(fitted) and len(fitted) + len(held) == 28
    assert np.array_equal(held, split_episodes(frames.episode[frames.good], 0.1, seed=0)[1])


def test_offline_metrics_score_a_policy_against_the_mean_action():
    import torch

    from embodied.policies import build_mlp, mlp_weights

    rng = np.random.default_rng(0)
    obs = rng.normal(size=(200, 3)).astype(np.float32)
    act = np.clip(obs[:, :2] * 0.3, -1, 1).astype(np.float32)
    model = build_mlp(3, 2, [])  # one linear layer: set it to the true map
    with torch.no_grad():
        model.net[0].weight.copy_(torch.tensor([[0.3, 0, 0], [0, 0.3, 0]]))
        model.net[0].bias.zero_()
    exact = offline_metrics(mlp_weights(model, 3, 2, [], [-1, -1], [1, 1]), obs, act, act.mean(0))
    assert exact["heldout_action_mse"] < 1e-10 and exact["heldout_action_r2"] > 0.999999
    assert exact["baseline_action_mse"] == pytest.approx(float(act.var(0).mean()), rel=1e-5)
    assert exact["heldout_frames"] == 200


def test_too_many_bad_episodes_fail_the_run_before_training(tmp_path):
    from embodied import train
    from pipelines.template import Run

    root = user_copy(tmp_path, nan_episodes=[0, 1])  # 3 of 31 episodes > input.max_reject_ratio 0.05
    run = Run(str(tmp_path / "run"))
    result = train.run(cfg_for(root), run)  # returns before any Ray work
    assert result.failure == f"3 of 31 episodes rejected (> input.max_reject_ratio 0.05); see {run.path('rejects')}"
    assert read_table(run.path("rejects"))["id"].to_pylist() == ["episode-0", "episode-1", "episode-17"]
    assert "policy" not in result.outputs and result.rejects == 3


def test_a_dataset_of_an_unknown_robot_is_evaluated_offline_only(tmp_path):
    """The evaluate step on a policy cloned from a dataset of another robot: held-out action MSE against
    the mean-action baseline, no simulator (so no Ray). The policy is a least-squares linear fit here."""
    import torch

    from embodied.evaluate import evaluate_on_input
    from embodied.policies import build_mlp, mlp_weights
    from pipelines.template import Run

    root = user_copy(tmp_path, rename_state="observation.joints", info_edit=lambda i: i.update(robot_type="my_arm"))
    spec = describe(cfg_for(root, "input.columns.state=observation.joints"))
    assert spec.env is None and "'my_arm' is not a simulator env" in spec.env_reason
    frames = load_frames(spec)
    fitted, held = split_episodes(frames.episode[frames.good], 0.1, seed=0)
    rows = frames.good & np.isin(frames.episode, fitted)
    x = np.hstack([frames.obs[rows], np.ones((rows.sum(), 1), np.float32)])
    coef = np.linalg.lstsq(x, frames.act[rows], rcond=None)[0]
    model = build_mlp(10, 2, [])
    with torch.no_grad():
        model.net[0].weight.copy_(torch.tensor(coef[:-1].T))
        model.net[0].bias.copy_(torch.tensor(coef[-1]))
    spec.heldout_episodes = held.tolist()
    spec.mean_action = frames.act[rows].mean(0).tolist()
    run = Run(str(tmp_path / "run"))
    result = evaluate_on_input(load(), mlp_weights(model, 10, 2, [], [-1, -1], [1, 1]), spec.as_json(), run)
    m = result.metrics
    assert result.failure is None and m["heldout_frames"] == 150 and "bc_return" not in m
    assert m["heldout_action_mse"] < m["baseline_action_mse"], m
    assert sorted(result.outputs) == ["evaluation", "plot_offline"]
    assert Path(result.outputs["plot_offline"]).read_bytes()[:4] == b"\x89PNG"
    report = read_json(result.outputs["evaluation"])
    assert report["env"] is None and report["state"] == "observation.joints"
    assert report["heldout_action_mse"] == m["heldout_action_mse"] and report["heldout_episodes"] == held.tolist()


# -------------------------------------------------------------- on the cluster
def test_bc_on_a_dataset_written_by_lerobot_with_simulator_evaluation(ray_connected, adbray_run_dir, capsys):
    dataset = upload_dir(str(FIXTURE), join(adbray_run_dir, "user-dataset"))  # the user's oss:// prefix
    before = local_run_traces()
    run_dir = join(adbray_run_dir, "run")
    code = TEMPLATE.main(["--input", dataset, "--run-dir", run_dir, *SMALL_TRAIN,
                          "--set", "evaluate.episodes=8", "--set", "evaluate.min_gap_closed=0",
                          "--set", "simulator.envs_per_actor=4"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == ["train", "evaluate"] and out["rejects"] == 1  # no collect; episode 17's dropout
    m = out["metrics"]
    assert m["episodes"] == 30 and m["rejected_episodes"] == 1
    assert m["train_episodes"] == 27 and m["heldout_episodes"] == 3 and m["train_frames"] == 27 * 50
    assert m["heldout_frames"] == 3 * 50
    # the cloned policy predicts held-out actions better than their mean (R^2 ~0.55 measured), and in the
    # simulator closes most of the random -> expert gap (~0.9 measured on 20 seeds)
    assert m["heldout_action_mse"] < 0.7 * m["baseline_action_mse"], m
    assert m["gap_closed"] >= 0.5 and m["expert_success_rate"] >= 0.95, m
    assert out["outputs"]["episodes"] == dataset  # read where it is, recorded in the run folder
    rejects = read_table(out["outputs"]["rejects"]).to_pylist()
    assert rejects == [{"id": "episode-17", "stage": "input",
                        "reason": "frame 20: observation.state: a value is not finite"}]
    assert exists(join(run_dir, "index.html"))
    report = read_json(out["outputs"]["evaluation"])
    assert report["env"] == "Reacher-v5" and report["policies"]["bc"]["return"] == m["bc_return"]
    assert report["offline"]["heldout_action_mse"] == m["heldout_action_mse"]
    trained_on = read_json(join(out["outputs"]["policy"], "dataset.json"))
    assert trained_on["heldout_episodes"] == report["heldout_episodes"] and len(trained_on["heldout_episodes"]) == 3
    assert trained_on["state_names"][:2] == ["cos_q1", "cos_q2"]
    assert sorted(k for k in out["outputs"] if k.startswith("plot")) == ["plot", "plot_loss", "plot_offline",
                                                                         "plot_success"]
    assert local_run_traces() == before
