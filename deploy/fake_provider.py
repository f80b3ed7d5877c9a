"""Ray's fake multi-node autoscaler provider, with one temp dir per worker raylet.

Several raylets on one host that share a session dir also share its
``runtime_resources``: each node's runtime-env agent re-extracts a job's
``working_dir`` there (Ray always overwrites), deleting the directory a running
driver has as its cwd. Giving every raylet its own temp dir keeps their
runtime-env folders apart; everything else is Ray's ``FakeMultiNodeProvider``.
Used through ``provider: {type: external, module: deploy.fake_provider.LocalFakeProvider}``.
"""

from __future__ import annotations

import ray._private.parameter as ray_parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

from pipelines.serving import SERVE_PORT_LABEL

from .local import free_port, worker_proxy_env


class LocalFakeProvider(FakeMultiNodeProvider):
    """FakeMultiNodeProvider whose worker raylets get ``<provider temp_dir>/a<N>`` as temp dir and
    their own Serve proxy port (like ``deploy.local.start_worker``)."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        temp_dir = f"{self.provider_config['temp_dir']}/a{self._next_node_id + 1}"
        original = ray_parameter.RayParams

        serve_port = free_port()
        labels = {**(labels or {}), SERVE_PORT_LABEL: str(serve_port)}

        def with_temp_dir(*args, **kwargs):
            kwargs.setdefault("temp_dir", temp_dir)
            kwargs["env_vars"] = {**(kwargs.get("env_vars") or {}), **worker_proxy_env(serve_port)}
            return original(*args, **kwargs)

        with self.lock:
            ray_parameter.RayParams = with_temp_dir
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                ray_parameter.RayParams = original
