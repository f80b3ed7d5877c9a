"""pipelines.training.fit: the controller's check interval reaches Ray Train, a user's own value wins."""
import os

from pipelines import training


class Trainer:
    def fit(self):
        return os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]


def test_fit_sets_a_short_check_interval_unless_one_is_set(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    assert training.fit(Trainer()) == "0.5"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    assert training.fit(Trainer()) == "3"


def test_ray_train_passes_the_interval_to_its_controller_and_workers():
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE, HEALTH_CHECK_INTERVAL_S_ENV_VAR

    assert HEALTH_CHECK_INTERVAL_S_ENV_VAR == "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    assert HEALTH_CHECK_INTERVAL_S_ENV_VAR in ENV_VARS_TO_PROPAGATE
