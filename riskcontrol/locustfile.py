"""Load-test your own riskcontrol deployment with Locust (``pip install -e '.[dev]'`` brings it).

    locust -f riskcontrol/locustfile.py --host http://HOST:PORT/riskcontrol
    locust -f riskcontrol/locustfile.py --host http://127.0.0.1:8000/riskcontrol --headless -u 20 -r 5 -t 1m

Each simulated payment switch sends ``/score`` requests built from the template's own transaction
generator (real card, merchant, amount, device and location mixes; ``RISKCONTROL_LOCUST_SEED``
picks another sample), with fresh transaction ids and the current time, and late labels to
``/labels``: one batch when it connects, then now and then. A reply other than 200 with a probability counts as a failure.
"""
from __future__ import annotations

import itertools
import os
import random
import time
from datetime import datetime, timezone

from locust import HttpUser, between, task

from riskcontrol.config import DataConfig
from riskcontrol.data import generate_shard
from riskcontrol.features import invalid_reasons
from riskcontrol.serve import transaction_payload

_SAMPLE = generate_shard(DataConfig(rows=2000, cards=200, merchants=50, days=5,
                                    seed=int(os.environ.get("RISKCONTROL_LOCUST_SEED", "7"))), 0)
_ROWS = _SAMPLE[invalid_reasons(_SAMPLE) == ""].to_dict("records")
_IDS = itertools.count(int(time.time() * 1000) * 1000)  # unique across runs, inside BIGINT


class PaymentSwitch(HttpUser):
    """One payment switch: a label batch when it connects, then a transaction every 50-200 ms and a label
    batch now and then."""

    wait_time = between(0.05, 0.2)

    def on_start(self):
        self.labels()

    def _transaction(self) -> dict:
        body = transaction_payload(random.choice(_ROWS))
        body["transaction_id"] = next(_IDS)
        body["event_time"] = datetime.now(timezone.utc).isoformat()
        return body

    @task(20)
    def score(self):
        with self.client.post("/score", json=self._transaction(), name="/score", catch_response=True) as r:
            if r.status_code != 200 or not 0.0 <= r.json().get("probability", -1.0) <= 1.0:
                r.failure(f"{r.status_code}: {r.text[:120]}")

    @task(1)
    def labels(self):
        txn = self._transaction()
        label = {"transaction_id": txn["transaction_id"], "merchant_id": txn["merchant_id"],
                 "label_time": txn["event_time"], "is_fraud": 0}
        with self.client.post("/labels", json=[label], name="/labels", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:120]}")
