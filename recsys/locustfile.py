"""Load-test your own recsys deployment with Locust (``pip install -e '.[dev]'`` brings it).

    locust -f recsys/locustfile.py --host http://HOST:PORT/recsys
    locust -f recsys/locustfile.py --host http://127.0.0.1:8000/recsys --headless -u 20 -r 5 -t 1m

Each simulated shopper asks for recommendations (GET and POST, some with a category or price
filter) and searches with words from product titles. User ids are drawn from ``0 ..
RECSYS_LOCUST_USERS-1`` (default 1000; unknown users get the popular fallback, still a 200), with a
few heavy users as in real traffic. A reply other than 200 with items counts as a failure.
"""
from __future__ import annotations

import os
import random

from locust import HttpUser, between, task

USERS = int(os.environ.get("RECSYS_LOCUST_USERS", "1000"))
WORDS = ["wireless", "cotton", "steel", "organic", "portable", "classic", "mini", "pro", "smart", "leather"]


def _user() -> int:
    return min(int(random.paretovariate(1.2)) - 1, USERS - 1)  # a few users send most requests


class Shopper(HttpUser):
    """One shopper: mostly recommendations, sometimes a search."""

    wait_time = between(0.05, 0.2)

    def _check(self, r):
        if r.status_code != 200 or not isinstance(r.json().get("items"), list):
            r.failure(f"{r.status_code}: {r.text[:120]}")

    @task(6)
    def recommend(self):
        with self.client.get("/recommend", params={"user_id": _user(), "k": 10}, name="/recommend GET",
                             catch_response=True) as r:
            self._check(r)

    @task(2)
    def recommend_filtered(self):
        body = {"user_id": _user(), "k": 10, "filters": {"max_price": random.choice([20, 50, 100, 500])}}
        with self.client.post("/recommend", json=body, name="/recommend POST", catch_response=True) as r:
            self._check(r)

    @task(2)
    def search(self):
        query = " ".join(random.sample(WORDS, 2))
        with self.client.get("/search", params={"query": query, "user_id": _user(), "k": 10}, name="/search",
                             catch_response=True) as r:
            self._check(r)
