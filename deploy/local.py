"""The local provider: a resource-group spec as a real multi-node Ray cluster on 127.0.0.1.

One head raylet (``num_cpus=0``: it schedules, runs no tasks; dashboard + job
server + Ray client server), one raylet per worker, scaled down to fit this
machine, each labelled with its worker group (``group=<name>``, ``type=CPU|GPU``).
Token auth is on (token file 0600 in the cluster's state folder), all ports are
free ones chosen here (never 6379/8265), object stores are bounded. With
``category: HIGH_AVAILABILITY`` GCS state lives in the local Redis, so the head
can be killed and restarted.

With ``autoscale=True`` (the rehearsal of a group whose min != max) the head
runs Ray's own autoscaler with its fake multi-node provider: worker raylets of
each group are added on logical resource demand up to the group's max (capped
by ``ADBRAY_LOCAL_AUTOSCALE_MAX``) and removed when idle, like the service.

State lives in ``.adbray/clusters/<name>/state.json`` (folders 0700, the token file
created 0600). Every Ray process of the cluster gets an allow-listed environment
(:data:`ENV_ALLOW`: never the launcher's cloud keys or other secrets) marked with
``ADBRAY_CLUSTER_DIR=<temp dir>``. ``up`` records the (pid, create time) of every
process of the cluster; ``down`` stops the recorded ones that are still the same
process, those whose command line or environment carries this cluster's temp dir
(autoscaled workers, job drivers; the dir name has a random suffix), and their
descendants — never a process merely because it names the cluster's ports.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines.io import first_line
from pipelines.serving import SERVE_PORT_LABEL
from pipelines.template import DISKS_MARKER

from . import isolate, objectstore
from .spec import ResourceGroupSpec

STATE_ROOT = Path(os.environ.get("ADBRAY_STATE", Path.home() / ".adbray"))
MB = 1024 * 1024
# How far a spec is scaled down locally (this machine has few cores).
LOCAL_MAX_WORKERS_PER_GROUP = int(os.environ.get("ADBRAY_LOCAL_MAX_WORKERS", "2"))
LOCAL_MAX_CPUS_PER_WORKER = int(os.environ.get("ADBRAY_LOCAL_MAX_CPUS", "2"))
LOCAL_WORKER_MEMORY = 2 * 1024 * MB
LOCAL_OBJECT_STORE = int(os.environ.get("ADBRAY_LOCAL_OBJECT_STORE_MB", "300")) * MB
HEAD_OBJECT_STORE = 200 * MB
REDIS_ADDRESS = os.environ.get("ADBRAY_REDIS_ADDRESS", "127.0.0.1:6379")
LOCAL_AUTOSCALE_MAX = int(os.environ.get("ADBRAY_LOCAL_AUTOSCALE_MAX", "3"))
AUTOSCALE_IDLE_S = float(os.environ.get("ADBRAY_LOCAL_IDLE_S", "10"))
# what a cluster's processes inherit from the environment that starts it (plus the cluster's own env)
ENV_ALLOW = {
    "PATH", "HOME", "LANG", "LANGUAGE", "TMPDIR", "USER", "LOGNAME", "SHELL", "TERM", "TZ", "VIRTUAL_ENV",
    "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "MUJOCO_GL", "PYOPENGL_PLATFORM", "OMP_NUM_THREADS",
    "HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE", "TORCH_HOME", "XDG_CACHE_HOME",
}
# Ray's own settings, ours, Python's, locales, and the object-storage endpoint/keys the templates read
# (pipelines.io: OSS_*; pyarrow's S3 client: AWS_*)
ENV_ALLOW_PREFIXES = ("RAY_", "ADBRAY_", "PYTHON", "LC_", "OSS_", "AWS_")
# another cluster's token/address/storage markers; a job's secrets
ENV_DENY = {"RAY_AUTH_TOKEN", "RAY_ADDRESS", "ADBRAY_SET", "ADBRAY_STORAGE", "ADBRAY_DISKS", "ADBRAY_SHARED_MOUNT"}
CLUSTER_MARKER = "ADBRAY_CLUSTER_DIR"  # in every process of a cluster: its temp dir
# "isolated" (the default: each worker raylet its own disk, where the OS allows) or "shared"
DISKS_DEFAULT = os.environ.get("ADBRAY_LOCAL_DISKS", "isolated")


class LocalClusterError(RuntimeError):
    """The local cluster could not be started, found or stopped."""


@dataclass
class NodePlan:
    group: str
    type: str
    num_cpus: int
    num_gpus: int
    memory: int = LOCAL_WORKER_MEMORY
    object_store_memory: int = LOCAL_OBJECT_STORE

    @property
    def labels(self) -> str:
        return f"group={self.group},type={self.type}"


@dataclass
class ClusterState:
    name: str
    category: str
    gcs_port: int
    dashboard_port: int
    client_port: int
    temp_dir: str
    token_path: str
    nodes: list[dict] = field(default_factory=list)
    scaling: list[str] = field(default_factory=list)
    redis_namespace: str | None = None
    head_pids: list[int] = field(default_factory=list)
    pids: list[list] = field(default_factory=list)  # [pid, create_time] of every process started for it
    extra_env: dict = field(default_factory=dict)
    autoscaling_config: str | None = None
    disks: str = "shared"  # "isolated": each worker raylet in its own mount namespace (deploy.isolate)
    private_paths: list[str] = field(default_factory=list)  # what an isolated worker gets a fresh tmpfs over
    shared_paths: list[str] = field(default_factory=list)  # ...and what is bound back under those
    storage: dict = field(default_factory=dict)  # the OSS stand-in: {"uri", "endpoint", "port"}

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def client_address(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    def token(self) -> str:
        """The cluster's Ray token; empty for a cluster started without one (``up(auth=False)``)."""
        return Path(self.token_path).read_text().strip() if self.token_path else ""

    def auth_env(self) -> dict:
        """How a client authenticates: the token file, or token auth off for a cluster without one."""
        if not self.token_path:
            return {"RAY_AUTH_MODE": "disabled"}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}

    def headers(self) -> dict:
        """HTTP headers for the dashboard's APIs."""
        return {"Authorization": f"Bearer {self.token()}"} if self.token_path else {}

    def env(self) -> dict:
        """Environment for a Ray client of this cluster (driver, CLI, job submit): the token, the
        address, the disks marker and the storage stand-in's endpoint and keys."""
        return {**self.auth_env(), "RAY_ADDRESS": self.gcs_address, **self.storage_env()}

    def storage_env(self) -> dict:
        """The disks marker (:data:`DISKS_MARKER`) and, with a stand-in, its OSS variables. An autoscaling
        cluster's workers share this machine's disk, but it rehearses a group whose nodes do not: its
        marker says ``isolated``, so local run folders are refused there as on the group."""
        env = {DISKS_MARKER: "isolated" if self.autoscaling_config else self.disks}
        if self.storage:
            env.update(objectstore.storage_env(self.storage["endpoint"], self.storage["uri"]))
        return env


def state_dir(name: str) -> Path:
    return STATE_ROOT / "clusters" / name


def private_dir(path: Path) -> Path:
    """``path`` (and missing parents) created 0700; it and its folders below STATE_ROOT made 0700."""
    path = Path(path)
    for p in reversed([path, *path.parents]):
        if not p.exists():
            p.mkdir(mode=0o700, exist_ok=True)
            os.chmod(p, 0o700)
        elif p == path or STATE_ROOT in p.parents:
            os.chmod(p, 0o700)
    return path


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a fresh 0600 file (O_CREAT|O_EXCL) renamed over it: at no
    moment is the content in a file others can read."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def free_port() -> int:
    """A free TCP port from the OS's ephemeral range (outside Ray's 10002-19999)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not (10002 <= port <= 19999) and port not in (6379, 8265, 10001):
            return port


def plan_nodes(spec: ResourceGroupSpec, max_workers: int = LOCAL_MAX_WORKERS_PER_GROUP,
               max_cpus: int = LOCAL_MAX_CPUS_PER_WORKER) -> tuple[list[NodePlan], list[str]]:
    """Worker raylets for a spec, scaled to this machine, and one line per group saying how."""
    nodes, notes = [], []
    for g in spec.worker_groups:
        count = min(g.min_workers, max_workers)
        cpus = min(g.cores, max_cpus)
        gpus = max(1, int(g.gpus)) if g.type == "GPU" else 0
        nodes += [NodePlan(g.name, g.type, cpus, gpus) for _ in range(count)]
        unit = f", {g.distribution_unit or 1} GPU/worker -> {gpus} logical GPU" if g.type == "GPU" else ""
        notes.append(
            f"{g.name}: {g.type} {g.spec} ({g.cores}C/{g.memory_gb}G) x{g.min_workers}..{g.max_workers}"
            f" -> local {count} worker(s) x {cpus} CPU{unit}"
        )
    return nodes, notes


def _ray_cmd() -> list[str]:
    """The ``ray`` CLI of this environment: the script beside this Python, else the same CLI through
    ``python -m`` (a venv that sees Ray through a .pth, e.g. a team repo's, has no ``ray`` script)."""
    script = Path(sys.executable).with_name("ray")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ray.scripts.scripts"]


def _start_env(state: ClusterState, ha: bool) -> dict:
    """The environment of the cluster's Ray processes: the allow-listed part of ours, the cluster's
    ``extra_env``, token auth, and the cluster marker."""
    env = {k: v for k, v in os.environ.items()
           if (k in ENV_ALLOW or k.startswith(ENV_ALLOW_PREFIXES)) and k not in ENV_DENY}
    env.update(state.extra_env)
    env.update(state.storage_env())
    env[CLUSTER_MARKER] = state.temp_dir
    # job entrypoints say `python ...`: make that this environment's Python even when
    # the venv is not activated (e.g. `.venv/bin/adbray cluster up`, `make test`)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.update(state.auth_env())
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    if ha:
        env.update(RAY_REDIS_ADDRESS=REDIS_ADDRESS, RAY_external_storage_namespace=state.redis_namespace)
    if state.autoscaling_config:
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    return env


def _run(cmd: list[str], env: dict, what: str) -> None:
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise LocalClusterError(f"{what} failed: {' | '.join(tail)}")


def start_head(state: ClusterState) -> None:
    """Start (or restart, same ports) the head raylet with 0 CPUs; remembers the head's pids."""
    # a restart on the same port: Ray refuses while the address file names a GCS
    # that surviving worker raylets still point at
    Path(state.temp_dir, "ray_current_cluster").unlink(missing_ok=True)
    before = {p.pid for p in processes(state)}
    cmd = [
        *_ray_cmd(), "start", "--head", "--num-cpus=0", "--num-gpus=0",
        f"--port={state.gcs_port}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={state.dashboard_port}",
        f"--ray-client-server-port={state.client_port}",
        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--object-store-memory={HEAD_OBJECT_STORE}", f"--temp-dir={state.temp_dir}",
        "--labels=group=head,type=HEAD", "--disable-usage-stats",
    ]
    if state.autoscaling_config:
        cmd.append(f"--autoscaling-config={state.autoscaling_config}")
    _run(cmd, {**haproxy_ports_env(), **_start_env(state, state.category == "HIGH_AVAILABILITY")},
         "starting the head")
    now = processes(state)
    on_workers = _worker_node_pids(state, now)  # what worker nodes started meanwhile is not the head's
    state.head_pids = sorted(p.pid for p in now if p.pid not in before and p.pid not in on_workers)
    record_processes(state)


def _worker_node_pids(state: ClusterState, procs: list) -> set[int]:
    """Pids of the worker nodes' processes among ``procs`` (the cluster's): those naming a worker's temp dir
    (``<temp_dir>/w<i>``) on their command line, and everything the worker raylets run (workers rename
    themselves, e.g. ``ray::IDLE``)."""
    import psutil

    mine, raylets = set(), {}
    for p in procs:
        try:
            if f"{state.temp_dir}/w" in " ".join(p.cmdline()):
                mine.add(p.pid)
                if p.name() == "raylet":
                    raylets[p.pid] = p
        except psutil.Error:
            continue
    return mine | set(_with_descendants(raylets))


def start_worker(state: ClusterState, node: NodePlan, index: int = 0) -> None:
    """Start one worker raylet; it gets its own temp dir (``<temp_dir>/w<index>``) so that raylets on
    this host never share a runtime-env folder (see ``deploy.fake_provider``), and its own Serve
    proxy port (see :func:`worker_proxy_env`)."""
    serve_port = free_port()
    cmd = [
        *_ray_cmd(), "start", f"--address={state.gcs_address}", "--node-ip-address=127.0.0.1",
        f"--num-cpus={node.num_cpus}", f"--num-gpus={node.num_gpus}", f"--memory={node.memory}",
        f"--object-store-memory={node.object_store_memory}",
        f"--labels={node.labels},{SERVE_PORT_LABEL}={serve_port}",
        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--temp-dir={state.temp_dir}/w{index}",
        "--disable-usage-stats",
    ]
    env = {**_start_env(state, False), **worker_proxy_env(serve_port)}
    if state.disks == "isolated":
        cmd = isolate.command(cmd, state.private_paths, state.shared_paths)
    _run(cmd, env, f"starting worker of group {node.group}")


def start_workers(state: ClusterState, nodes: list[NodePlan]) -> None:
    """Start the worker raylets side by side (``ray start`` spends ~3 s each, most of it waiting on its
    raylet); the first failure is raised once all have returned."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        for started in [pool.submit(start_worker, state, n, i) for i, n in enumerate(nodes)]:
            started.result()


def worker_proxy_env(port: int) -> dict:
    """Environment of a worker raylet whose Serve HTTP proxy binds ``port``.

    On one host every raylet's proxy would otherwise bind the same port through
    SO_REUSEPORT, so the kernel spreads connections over proxies at random and a
    client cannot tell which proxy (node) answered. A port per worker (Ray reads
    ``RAY_SERVE_WORKER_PROXY_HTTP_PORT``; the head keeps Serve's configured port)
    makes each proxy addressable, as each node's is on a real group. The port is
    also the node's ``serve-port`` label, which :func:`pipelines.serving.proxy_urls` reads. With Serve's
    HAProxy ingress on (``RAY_SERVE_ENABLE_HA_PROXY=1``), each node's HAProxy also binds a metrics and a
    stats port on all interfaces (Ray's defaults 9101 and 8404): on one host the second node's HAProxy
    exits ("Address already in use") and that node's proxy stays STARTING, so they get free ports too.
    """
    return {"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(port), **haproxy_ports_env()}


def haproxy_ports_env() -> dict:
    """Free ports for a node's HAProxy metrics and stats listeners (see :func:`worker_proxy_env`)."""
    return {"RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}


def autoscaling_config(spec: ResourceGroupSpec, gcs_address: str, temp_dir: str,
                       max_cpus: int = LOCAL_MAX_CPUS_PER_WORKER, max_workers: int = LOCAL_AUTOSCALE_MAX,
                       idle_s: float | None = None) -> dict:
    """A complete autoscaler config (Ray's fake multi-node provider): one node type per worker group."""
    types = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    total = 0
    for g in spec.worker_groups:
        hi = min(g.max_workers, max_workers)
        lo = min(g.min_workers, hi)
        res = {"CPU": min(g.cores, max_cpus), "object_store_memory": LOCAL_OBJECT_STORE}
        if g.type == "GPU":
            res["GPU"] = max(1, int(g.gpus))
        types[g.name] = {"resources": res, "labels": {"group": g.name, "type": g.type}, "node_config": {},
                         "min_workers": lo, "max_workers": hi}
        total += hi
    return {
        "cluster_name": spec.name, "max_workers": total, "upscaling_speed": 1.0,
        "idle_timeout_minutes": (AUTOSCALE_IDLE_S if idle_s is None else idle_s) / 60.0,
        "provider": {"type": "external", "module": "deploy.fake_provider.LocalFakeProvider",
                     "gcs_address": gcs_address, "temp_dir": temp_dir, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"}, "docker": {}, "head_node_type": "ray.head.default",
        "available_node_types": types, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


# Serve's proxies send requests to replicas over gRPC instead of Ray actor calls. Through a head restart
# the actor-call path lost 1,740-2,900 of ~3,000 requests at 50 req/s on the worker's proxy (its backlog
# never drained while the load went on); over gRPC none (docs/deploy.md, Head restart).
HA_SERVE_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}


def up(spec: ResourceGroupSpec, token: str | None = None, log=print, env: dict | None = None,
       autoscale: bool = False, disks: str | None = None, storage: bool = True, auth: bool = True,
       idle_s: float | None = None) -> ClusterState:
    """Start the spec as a local multi-node cluster; returns its state.

    ``env`` is set on every Ray process of the cluster (e.g. Serve's
    ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``); a HIGH_AVAILABILITY cluster also gets :data:`HA_SERVE_ENV`
    unless ``env`` says otherwise. ``autoscale`` runs Ray's autoscaler
    (fake multi-node provider) so groups scale between min and max workers, removing a worker idle
    for ``idle_s`` seconds (default ``AUTOSCALE_IDLE_S``).
    ``disks`` is ``"isolated"`` (default, see :func:`plan_disks`) or ``"shared"``;
    ``storage`` starts the OSS stand-in (:mod:`deploy.objectstore`) with a bucket. ``auth=False``
    starts it without a token (``RAY_AUTH_MODE=disabled``), like a group made in the console.
    """
    sdir = state_dir(spec.name)
    if (sdir / "state.json").exists():
        existing = load_state(spec.name)
        if processes(existing):
            raise LocalClusterError(f"cluster {spec.name!r} is already up ({existing.dashboard_url}); "
                                    f"run `adbray cluster down --name {spec.name}` first")
        shutil.rmtree(sdir, ignore_errors=True)
    private_dir(sdir)
    token_path = write_private(sdir / "auth_token", token or spec.auth_token or secrets.token_hex(32)) if auth else ""
    nodes, notes = plan_nodes(spec)
    state = ClusterState(
        name=spec.name, category=spec.category, gcs_port=free_port(), dashboard_port=free_port(),
        client_port=free_port(), temp_dir=f"/tmp/adbray-{spec.name[:12]}-{secrets.token_hex(3)}",
        token_path=str(token_path), nodes=[asdict(n) for n in nodes], scaling=notes,
        redis_namespace=f"adbray-{spec.name}-{secrets.token_hex(4)}" if spec.category == "HIGH_AVAILABILITY"
        else None,
        extra_env={**(HA_SERVE_ENV if spec.category == "HIGH_AVAILABILITY" else {}), **(env or {})},
    )
    if autoscale:
        idle_s = AUTOSCALE_IDLE_S if idle_s is None else idle_s
        cfg = autoscaling_config(spec, state.gcs_address, state.temp_dir, idle_s=idle_s)
        path = sdir / "autoscaling.json"
        path.write_text(json.dumps(cfg, indent=2))
        state.autoscaling_config = str(path)
        notes = [f"{n}: autoscaling {t['min_workers']}..{t['max_workers']} local worker(s) x "
                 f"{t['resources']['CPU']} CPU (idle {idle_s:g}s)"
                 for n, t in cfg["available_node_types"].items() if n != "ray.head.default"]
        nodes = [NodePlan(g, t["labels"]["type"], t["resources"]["CPU"], t["resources"].get("GPU", 0))
                 for g, t in cfg["available_node_types"].items() if g != "ray.head.default"
                 for _ in range(t["min_workers"])]
        state.nodes, state.scaling = [asdict(n) for n in nodes], notes
    state.disks, why = plan_disks(disks or DISKS_DEFAULT, autoscale)
    if why:
        log(why)
    if state.disks == "isolated":
        state.private_paths, state.shared_paths = private_and_shared_paths(sdir)
    if storage:
        port = free_port()
        state.storage = {"uri": spec.storage or f"oss://{objectstore.bucket_name(spec.name)}/",
                         "endpoint": f"http://127.0.0.1:{port}", "port": port}
    save_state(state)
    for line in notes:
        log(f"scaling {line}")
    try:
        if storage:
            state.storage["pid"] = objectstore.start(port, _start_env(state, False), sdir / "objectstore.log").pid
            save_state(state)
            objectstore.create_bucket(state.storage["endpoint"], state.storage["uri"])
            record_processes(state)
        try:
            start_head(state)
        except LocalClusterError as e:  # Ray waits a fixed 30 s for the raylet: slow on a loaded box
            if "timed out during startup" not in str(e):
                raise
            log("the head timed out during startup (a loaded machine); retrying once")
            kill_processes([p for p in processes(state) if p.pid != state.storage.get("pid")])
            start_head(state)
        if not autoscale:  # with the autoscaler, it launches the min workers itself
            start_workers(state, nodes)
        wait_for_nodes(state, 1 + len(nodes), timeout=180 if autoscale else 90)
        record_processes(state)
    except Exception:
        down(spec.name, log=lambda *_: None)
        raise
    log(f"cluster {spec.name} up: {state.dashboard_url} (ray client {state.client_address}), "
        + (f"token {state.token_path}" if auth else "no token (RAY_AUTH_MODE=disabled)"))
    log(f"disks: {state.disks}" + (f"; storage {state.storage['uri']} at {state.storage['endpoint']}"
                                   if state.storage else ""))
    return state


def plan_disks(wanted: str, autoscale: bool = False) -> tuple[str, str | None]:
    """``("isolated" | "shared", why it is shared or None)``: isolation needs private mount
    namespaces (Linux, root or user namespaces) and raylets this module starts itself."""
    if wanted not in ("isolated", "shared"):
        raise LocalClusterError(f"disks must be 'isolated' or 'shared', not {wanted!r}")
    if wanted == "shared":
        return "shared", None
    if autoscale:
        return "shared", ("disks: shared (workers the autoscaler adds are started by Ray's fake provider, "
                          "outside a private mount namespace)")
    problem = isolate.unshare_problem()
    if problem:
        return "shared", f"disks: shared, not isolated: {problem}"
    return "isolated", None


def private_and_shared_paths(sdir: Path) -> tuple[list[str], list[str]]:
    """What an isolated worker sees privately (``/tmp`` and the run-folder root ``$ADBRAY_RUNS`` or
    ``./runs``) and what stays shared beneath those (this Python's environment, adbray's code, the
    import path, the cluster's state folder with its token)."""
    from pipelines.io import is_remote, runs_root

    runs = runs_root()
    private = ["/tmp"] + ([] if is_remote(runs) else [str(Path(runs).resolve())])
    code = Path(__file__).resolve().parent.parent
    shared = {sys.prefix, sys.base_prefix, str(code), str(Path(sdir).resolve()),
              *(p for p in sys.path if p and os.path.isdir(p))}
    return private, sorted(shared)


def save_state(state: ClusterState) -> None:
    path = state_dir(state.name) / "state.json"
    path.write_text(json.dumps(asdict(state), indent=2))


def load_state(name: str) -> ClusterState:
    path = state_dir(name) / "state.json"
    if not path.is_file():
        raise LocalClusterError(f"no local cluster named {name!r} (no {path})")
    return ClusterState(**json.loads(path.read_text()))


def find_by_address(*addresses: str) -> ClusterState | None:
    """The local cluster whose dashboard or ``ray://`` address is one of ``addresses`` (None when none
    is one of this machine's clusters)."""
    wanted = {a.rstrip("/").replace("localhost", "127.0.0.1") for a in addresses if a}
    for name in list_clusters():
        try:
            state = load_state(name)
        except (LocalClusterError, OSError, ValueError, TypeError):
            continue
        if wanted & {state.dashboard_url, state.client_address}:
            return state
    return None


def list_clusters() -> list[str]:
    root = STATE_ROOT / "clusters"
    return sorted(p.name for p in root.iterdir() if (p / "state.json").exists()) if root.is_dir() else []


def alive_nodes(state: ClusterState, timeout: float = 10.0) -> list[dict]:
    """Alive nodes as the GCS reports them (via the dashboard's state API)."""
    import urllib.request

    req = urllib.request.Request(f"{state.dashboard_url}/api/v0/nodes?limit=1000&detail=1",
                                 headers=state.headers())
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = json.loads(resp.read())
    rows = body.get("data", {}).get("result", {}).get("result", [])
    return [r for r in rows if r.get("state") == "ALIVE"]


def wait_for_nodes(state: ClusterState, count: int, timeout: float = 90.0, exact: bool = False) -> list[dict]:
    """Block until ``count`` nodes are alive (``exact``: exactly that many, stopped ones reported dead);
    raise LocalClusterError on timeout."""
    deadline, last = time.time() + timeout, "no answer"
    while time.time() < deadline:
        try:
            nodes = alive_nodes(state)
            if len(nodes) == count or (len(nodes) > count and not exact):
                return nodes
            last = f"{len(nodes)} nodes alive, waiting for {count}" if exact else f"{len(nodes)} of {count} nodes alive"
        except OSError as e:
            last = str(e)
        time.sleep(0.25)  # a node joins within a second of its raylet's start: check often
    raise LocalClusterError(f"cluster {state.name}: {last} after {timeout:.0f}s")


def status(name: str) -> dict:
    """Nodes, resources and addresses of a running local cluster."""
    state = load_state(name)
    info = {"name": name, "category": state.category, "dashboard_url": state.dashboard_url,
            "ray_address": state.client_address, "gcs_address": state.gcs_address,
            "token_path": state.token_path, "scaling": state.scaling, "processes": len(processes(state)),
            "disks": state.disks}
    if state.storage:
        info["storage"] = {"uri": state.storage["uri"], "endpoint": state.storage["endpoint"]}
    try:
        nodes = alive_nodes(state)
    except OSError as e:
        info.update(up=False, error=str(e), nodes=[])
        return info
    info["up"] = True
    info["nodes"] = [
        {"node_id": n["node_id"], "head": n.get("is_head_node", False),
         "labels": {k: v for k, v in (n.get("labels") or {}).items() if not k.startswith("ray.io/")},
         "resources": {k: v for k, v in (n.get("resources_total") or {}).items()
                       if k in ("CPU", "GPU", "memory", "object_store_memory")}}
        for n in nodes
    ]
    total: dict[str, float] = {}
    for n in info["nodes"]:
        for k, v in n["resources"].items():
            total[k] = total.get(k, 0) + v
    info["resources"] = total
    return info


def _carries(p, temp_dir: str) -> bool:
    """Whether a process names this cluster's temp dir on its command line or in its environment."""
    import psutil

    try:
        if temp_dir in " ".join(p.info["cmdline"] or ()):
            return True
        return p.environ().get(CLUSTER_MARKER) == temp_dir
    except (psutil.Error, TypeError):
        return False


def _recorded(state: ClusterState) -> list:
    """The recorded processes that are still the same process (same pid and create time)."""
    import psutil

    found = []
    for pid, created in state.pids:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 0.01:
                found.append(p)
        except psutil.Error:
            continue
    return found


def processes(state: ClusterState) -> list:
    """Every live process of this cluster: the recorded ones still alive, those that carry its temp dir
    (command line or environment), and all their descendants. A process that merely names the
    cluster's ports is not one of them."""
    import psutil

    found = {p.pid: p for p in _recorded(state)}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid not in found and _carries(p, state.temp_dir):
            found[p.pid] = p
    # agents, dashboard modules and workers rename themselves: take every descendant too
    found = _with_descendants(found)
    found.pop(os.getpid(), None)
    return list(found.values())


def _with_descendants(found: dict) -> dict:
    """``found`` (pid -> process) plus every descendant of its processes."""
    import psutil

    for p in list(found.values()):
        try:
            for child in p.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.Error:
            pass
    return found


def record_processes(state: ClusterState) -> None:
    """Remember (pid, create time) of the cluster's processes now, for ``down``; saves the state."""
    import psutil

    known = {pid: created for pid, created in state.pids}
    for p in processes(state):
        try:
            known[p.pid] = p.create_time()
        except psutil.Error:
            continue
    state.pids = sorted([pid, created] for pid, created in known.items())
    save_state(state)


def kill_processes(procs: list, grace: float = 5.0) -> None:
    import psutil

    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)


def head_processes(state: ClusterState) -> list:
    """The head node's processes: those ``ray start --head`` started (GCS, head raylet, dashboard, client
    server, monitor, agents) and what the head raylet runs (its workers: job supervisors and their
    drivers, the actors placed there). Worker raylets are not among them, not even the ones Ray's
    fake autoscaler (the head's monitor) started."""
    import psutil

    started = [p for p in processes(state) if p.pid in set(state.head_pids)]
    found = {p.pid: p for p in started}
    for p in started:
        try:
            if Path(p.exe()).name == "raylet" or p.name() == "raylet":
                found = {**found, **_with_descendants({p.pid: p})}
        except psutil.Error:
            continue
    return list(found.values())


def restart_head(state: ClusterState, timeout: float = 180.0, log=print) -> dict:
    """Stop exactly the head's processes (:func:`head_processes`) of a HIGH_AVAILABILITY cluster and start
    the head again on the same ports; the GCS state comes back from Redis. Returns once the cluster is
    whole again: a new head node alive and every worker node that was alive before reconnected (the same
    node ids: the worker raylets stay up and re-register, as on the service). A worker raylet gives up on
    its GCS after ~60 s (``gcs_rpc_server_reconnect_timeout_s``), so the head comes back well before that.

    Returns timings in seconds from the moment the stop began: ``stopped_s`` (head processes gone),
    ``started_s`` (``ray start --head`` returned), ``recovered_s`` (cluster whole, dashboard answering),
    plus the old and new head node ids and the worker node ids. A BASIC cluster is refused: without
    Redis the GCS state (actors, jobs, Serve apps) is lost with the head."""
    if state.category != "HIGH_AVAILABILITY":
        raise LocalClusterError(f"cluster {state.name} is {state.category}: a head restart needs HIGH_AVAILABILITY "
                                f"(GCS state in Redis); without it actors, jobs and Serve apps are lost")
    try:
        before = alive_nodes(state)
    except OSError as e:
        raise LocalClusterError(f"cluster {state.name} does not answer ({first_line(e)}): is it up?") from None
    old_head = next((n["node_id"] for n in before if n.get("is_head_node")), None)
    workers = {n["node_id"] for n in before if not n.get("is_head_node")}
    head = head_processes(state)
    if not head:
        raise LocalClusterError(f"cluster {state.name}: no head processes found (is it up?)")
    log(f"cluster {state.name}: stopping the head ({len(head)} processes)")
    t0 = time.monotonic()
    kill_processes(head, grace=3)
    stopped = time.monotonic() - t0
    start_head(state)  # same GCS/dashboard/client ports
    started = time.monotonic() - t0
    log(f"cluster {state.name}: head started again after {started:.1f}s; waiting for {len(workers)} worker(s)")
    deadline, last = t0 + timeout, "no answer"
    while True:
        try:
            alive = alive_nodes(state, timeout=5)
            heads = [n["node_id"] for n in alive if n.get("is_head_node")]
            back = workers & {n["node_id"] for n in alive if not n.get("is_head_node")}
            if len(heads) == 1 and heads[0] != old_head and back == workers:
                break
            last = f"{len(heads)} new head(s), {len(back)} of {len(workers)} worker(s) reconnected"
        except OSError as e:  # the restarted dashboard is not answering yet
            last = first_line(e)
        if time.monotonic() > deadline:
            raise LocalClusterError(f"cluster {state.name}: not whole {timeout:.0f}s after the head restart: {last}")
        time.sleep(0.25)
    recovered = time.monotonic() - t0
    log(f"cluster {state.name}: whole again {recovered:.1f}s after the head stopped")
    return {"stopped_s": round(stopped, 2), "started_s": round(started, 2), "recovered_s": round(recovered, 2),
            "old_head": old_head, "new_head": heads[0], "workers": sorted(workers)}


def down(name: str, log=print) -> int:
    """Stop every process of this cluster, and nothing else; returns how many were stopped. SIGTERM, then
    SIGKILL after 1 s: the cluster's state goes with it (temp dir, Redis namespace), so a graceful exit saves
    nothing, and Ray 2.60's GCS, raylets, runtime-env agents and autoscaler monitor do not exit on SIGTERM
    within 8 s here (a 5 s grace made every ``down`` take ~7 s)."""
    state = load_state(name)
    procs = processes(state)
    kill_processes(procs, grace=1.0)
    leftover = processes(state)
    if leftover:
        kill_processes(leftover, grace=1.0)
    if state.redis_namespace:
        _clear_redis(state.redis_namespace)
    shutil.rmtree(state.temp_dir, ignore_errors=True)
    shutil.rmtree(state_dir(name), ignore_errors=True)
    log(f"cluster {name} down: stopped {len(procs)} processes")
    return len(procs)


def _clear_redis(namespace: str) -> None:
    try:
        import redis

        host, port = REDIS_ADDRESS.rsplit(":", 1)
        r = redis.Redis(host=host, port=int(port), socket_timeout=3)
        for key in r.scan_iter(match=f"*{namespace}*", count=1000):
            r.delete(key)
    except Exception as e:  # noqa: BLE001 - the cluster is down either way; a stale namespace is harmless
        print(f"warning: could not clear Redis namespace {namespace}: {e}", file=sys.stderr)


# -- changes to a running cluster (what ModifyDBResourceGroup does to the nodes) ---------------------


def node_processes(state: ClusterState, node_id: str) -> list:
    """The processes of one node of this cluster: its raylet (``--node_id=<id>``), the agents and services
    started for it (``--node-id=<id>``, or its session folder on their command line), and their descendants."""
    import psutil

    procs = processes(state)
    mine = {}
    for p in procs:
        try:
            line = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if f"--node_id={node_id}" in line or f"--node-id={node_id}" in line:
            mine[p.pid] = p
            session = next((a.split("=", 1)[1] for a in p.cmdline()
                            if a.startswith(("--session_dir=", "--session-dir="))), None)
            if session:
                for q in procs:
                    try:
                        if session in " ".join(q.cmdline()):
                            mine.setdefault(q.pid, q)
                    except psutil.Error:
                        continue
    return list(_with_descendants(mine).values())


def stop_node(state: ClusterState, node_id: str) -> int:
    """Stop one worker node (as the service does when it deletes or restarts it); how many processes."""
    procs = node_processes(state, node_id)
    if not procs:
        raise LocalClusterError(f"cluster {state.name}: no processes of node {node_id[:12]}")
    kill_processes(procs)
    return len(procs)


def next_worker_index(state: ClusterState) -> int:
    """A worker temp-dir index (``<temp_dir>/w<N>``) no raylet of this cluster has used."""
    used = [int(p.name[1:]) for p in Path(state.temp_dir).glob("w*") if p.name[1:].isdigit()]
    return max(used, default=len(state.nodes) - 1) + 1


def apply_change(state: ClusterState, old: ResourceGroupSpec, new: ResourceGroupSpec, log=print) -> list[str]:
    """Change a running cluster from ``old`` to ``new`` the way the service does, on real raylets: a group's
    workers restart (stopped, started with the new shape) when its spec or type changes, workers above the
    new max are deleted (and missing ones up to the new min started), a removed group's workers are deleted,
    an added group's min workers started. The head is not restarted locally (said in the result). An
    autoscaling cluster gets the new config (Ray's autoscaler reloads it) and its changed groups' nodes
    stopped, which the autoscaler replaces. Returns one line per node action."""
    nodes = [n for n in alive_nodes(state) if not n.get("is_head_node")]
    by_group: dict[str, list[dict]] = {}
    for n in nodes:
        by_group.setdefault((n.get("labels") or {}).get("group", "?"), []).append(n)
    olds, news = {g.name: g for g in old.worker_groups}, {g.name: g for g in new.worker_groups}
    done, stop, start = [], [], []
    if old.head.spec != new.head.spec:
        done.append(f"head: spec {old.head.spec} -> {new.head.spec} recorded (the local head is not restarted)")
    for name, running in sorted(by_group.items()):
        g, n = olds.get(name), news.get(name)
        if g is None and n is None:  # not a worker group of either spec: left alone
            continue
        if n is None:
            stop += [(name, x, "deleted (group removed)") for x in running]
            continue
        if g is not None and (g.type, g.spec) != (n.type, n.spec):
            stop += [(name, x, f"restarted ({g.spec} -> {n.spec})") for x in running]
            keep = 0
            want = min(max(len(running), n.min_workers), n.max_workers, LOCAL_MAX_WORKERS_PER_GROUP)
        else:
            want = min(max(len(running), min(n.min_workers, LOCAL_MAX_WORKERS_PER_GROUP)), n.max_workers)
            keep = min(len(running), want)
            stop += [(name, x, f"deleted (above the new max {n.max_workers})") for x in running[keep:]]
        start += [n] * (want - keep)
    for name, n in news.items():
        if name not in by_group:
            start += [n] * min(n.min_workers, LOCAL_MAX_WORKERS_PER_GROUP)
    if state.autoscaling_config:
        cfg = autoscaling_config(new, state.gcs_address, state.temp_dir)
        write_private(Path(state.autoscaling_config), json.dumps(cfg, indent=2))
        done.append("autoscaling config updated (Ray's autoscaler reloads it)")
        start = []  # the autoscaler launches what the new config asks for
    for name, node, what in stop:
        stop_node(state, node["node_id"])
        done.append(f"{name}: worker {node['node_id'][:12]} {what}")
    plans = []
    for g in start:
        plan = NodePlan(g.name, g.type, min(g.cores, LOCAL_MAX_CPUS_PER_WORKER),
                        max(1, int(g.gpus)) if g.type == "GPU" else 0)
        start_worker(state, plan, next_worker_index(state))
        plans.append(plan)
        done.append(f"{g.name}: worker started ({g.type} {g.spec})")
    if not state.autoscaling_config:
        remaining = len(nodes) - len(stop) + len(plans)
        wait_for_nodes(state, 1 + remaining, exact=True)
        state.nodes = [n for n in state.nodes if n["group"] in news] + [asdict(p) for p in plans]
    record_processes(state)
    for line in done:
        log(f"{state.name}: {line}")
    return done
