"""The squares example's declaration (see :mod:`pipelines.template`)."""
from pipelines.template import Step, Template

from . import job

TEMPLATE = Template(
    name="squares", package="deploy.examples.squares", load_config=job.load, key_metric="sum_of_squares",
    description="Sums of squares on a bounded actor pool (the deploy layer's example job).",
    steps=[Step("squares", job.run, help="square the numbers on the actor pool; optionally flood tasks")],
    test_overrides=["items=16", "chunks=4"],
)
