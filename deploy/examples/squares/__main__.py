"""Example job for the deploy layer: sums of squares on a bounded actor pool.

    python -m deploy.examples.squares [--config FILE] [--set pool.max_actors=2]

It has a template's shape (config model, ``configs/local.yaml``, ``configs/cluster.yaml``,
``resource_group.yaml``, ``template.py``) and stands in for one in the deploy tests.
"""
from .template import TEMPLATE

if __name__ == "__main__":
    TEMPLATE.exit()
