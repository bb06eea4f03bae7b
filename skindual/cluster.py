"""The Ray cluster a job runs on: connecting to it, what it has and can launch, where outputs may live.

A job asks three things of its cluster before it starts work, all here:

- `init_ray`: connect to ``RAY_ADDRESS`` / the cluster of ``ray job submit``, or start an embedded
  one bound to 127.0.0.1; of the workers' output, show skindual's lines and the workers' errors.
- `cluster_shape`: the node shapes the cluster has now AND those its autoscaler can launch.  A
  cluster that autoscales from zero GPU nodes (cluster.yaml) has no GPU until a job asks for one, so
  "auto" GPU requests (`resolve_gpus`) and accelerator types (`check_accelerator`) resolve from the
  autoscaler's node types, read from the GCS (autoscaler v2, KubeRay) or from the autoscaling config
  of the head's monitor (``ray up``); when neither can be read, "auto" is refused with one line.
- `check_shared_paths`: on a cluster of several nodes, or one that can grow, a local path written or
  read by workers exists on one node only, so it is refused unless the user declares it shared
  (`SHARED_FS_ENV`); a relative path inside Ray's copy of the working dir is refused on any cluster.

Inside a Ray task or actor, `reserved_device` is the device Ray reserved for it: a GPU node's CUDA is
visible to every process there, so ``torch.cuda.is_available()`` says nothing about what was reserved.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from skindual.cli import OUR_LINE, RAY_DATA_RESTART_NOTE, drop_native_lines, verbose
from skindual.errors import UserError

SHARED_FS_ENV = "SKINDUAL_SHARED_FS"
"""Colon-separated folders every node of the cluster mounts (an NFS or EFS mount, say): local paths
under them are accepted on a cluster of several nodes.  ``/``: every path (all nodes on one machine)."""
WORKING_DIR_MARK = "runtime_resources/working_dir_files"
"""Part of the path of Ray's unpacked copy of ``--working-dir``: a job whose current directory is
under it was submitted with ``ray job submit --working-dir``."""
ACCELERATOR_PREFIX = "accelerator_type:"
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch between a local-only node (0: bound to 127.0.0.1) and one of a cluster (`_loopback_ray`)."""
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"
"""The port Ray binds a starting head node's GCS to (unset or 0: any free one; `_start_embedded`)."""


def init_ray(min_cpus: int = 1) -> None:
    """Connect to the cluster of RAY_ADDRESS / `ray job submit`, or start an embedded local one.

    The embedded cluster binds 127.0.0.1 only (`_loopback_ray`), its token file is the user's alone
    (`_private_token_file`), and it advertises at least `min_cpus` logical CPUs, so that training or
    generation actors and the Ray Data tasks that feed them can all be scheduled on a small machine.
    Unless --verbose, Ray's own start-up, plan and progress output stays in its log files, and of the
    workers' output the job shows skindual's lines and their errors (`forwarded_lines`).
    """
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "")
    _loopback_ray(address)
    import ray
    import ray.data

    loud = verbose()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = loud  # the jobs report their own progress in lines (`cli.Progress`)
    if not loud:  # Ray's plan, start-up and auth lines stay in its log files unless --verbose
        context.print_on_execution_start = False
        for handler in logging.getLogger("ray.data").handlers:
            if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
                handler.setLevel(logging.ERROR)
    level = logging.INFO if loud else logging.ERROR
    if address:
        try:
            ray.init(logging_level=level)
        except ConnectionError as error:  # Ray's own words end a traceback of its retries: one line instead
            raise UserError(unreachable_cluster(address, error)) from None
    else:
        _private_token_file()
        _start_embedded(max(os.cpu_count() or 1, min_cpus), level)
    if not loud:
        _forward_only_our_lines()
        drop_native_lines(RAY_DATA_RESTART_NOTE)  # Ray Data's own, on every actor pool (it stays in Ray's log)


def unreachable_cluster(address: str, error: BaseException) -> str:
    """What to do when ``ray.init`` could not join the cluster at RAY_ADDRESS (`error`: its ConnectionError, whose
    cause holds the GCS client's last failure): the cluster wants a token this driver did not send, or no Ray
    cluster answers there."""
    said = f"{error} {error.__cause__ or ''}"
    if "InvalidAuthToken" in said or "AuthenticationError" in said:
        return (f"RAY_ADDRESS {address}: that cluster runs with token authentication and refused this driver; set "
                "RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN_PATH if its token is not ~/.ray/auth_token), as "
                "`ray job submit` needs too")
    return (f"RAY_ADDRESS {address}: no Ray cluster answered there; start it (`ray start --head`), correct "
            "RAY_ADDRESS, or unset it and the job starts a local cluster of its own")


def _start_embedded(num_cpus: int, level: int) -> None:
    """Start the embedded cluster with its GCS on a loopback port picked here, and tell its workers that address.

    Ray's own actors that look their cluster up without an address (Ray Train's placement-group cleaner asks the
    state API so, every few seconds) take RAY_ADDRESS, else the cluster `ray start` recorded last, else the one
    GCS process running on the machine.  An embedded cluster is not recorded, so beside a second Ray instance on
    the machine (another job's embedded cluster, a local `ray start`) that lookup fails: the cleaner stops
    watching and its traceback reaches the job's output.  The job's workers get RAY_ADDRESS through the job's
    runtime environment, which Ray fixes when the driver connects, before the cluster's port is otherwise known."""
    import socket

    import ray

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # free now; Ray binds it a moment later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    previous = os.environ.get(GCS_PORT_ENV)
    os.environ[GCS_PORT_ENV] = str(port)  # read by Ray when it starts a head node's GCS
    try:
        ray.init(num_cpus=num_cpus, logging_level=level,
                 runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{port}"}})
    finally:
        if previous is None:
            os.environ.pop(GCS_PORT_ENV, None)
        else:
            os.environ[GCS_PORT_ENV] = previous


def _loopback_ray(address: str) -> None:
    """Keep an embedded cluster, or one at a 127.0.0.1 address, on the loopback interface.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when `ray` is first imported: on Linux it is on
    by default, and then Ray swaps 127.0.0.1 for the machine's address (and cannot connect to a cluster
    bound to 127.0.0.1), and an embedded cluster's GCS, raylet, workers and agents listen on every
    interface.  So it is set to 0 here, before `import ray`, and for the processes Ray starts; if the caller
    imported `ray` earlier, Ray's reading of it is redone.  A remote address is left to Ray's own choice."""
    if address and not address.startswith(("127.", "localhost")):
        return
    os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    if "ray" in sys.modules:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(LOCAL_ONLY_ENV, True)


def _private_token_file() -> None:
    """Before an embedded cluster starts: the token file Ray reads and, when missing, writes
    (``~/.ray/auth_token``, which turns token authentication on for every later cluster of this user)
    readable by this user only.  Ray writes it with the umask's mode, 0644 usually, and whoever reads
    it can run code on the user's clusters; a new one is created 0600 here, an existing one made 0600."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        if token.exists():
            if token.stat().st_mode & 0o077 and token.stat().st_uid == os.getuid():
                token.chmod(0o600)
            return
        token.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:  # another process's token, or a read-only home: Ray's own handling
        return
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(32))  # as `ray get-auth-token --generate` makes one


WORKER_ERROR = re.compile(
    r"\b(?:ERROR|CRITICAL|FATAL)\b|Fatal Python error|\*\*\* SIG[A-Z]+ received"  # logging, faulthandler, Ray
    r"|\w*(?:Error|Exception)\b"  # an exception's line (`RuntimeError: ...`), also in Ray's notes
    r"|^\[\S+ \S+ [EF] \d+ \d+\]|(?:^|\[)[EF]\d{4} \d\d:\d\d:\d\d"  # Ray's, glog's (torch's) C++ lines at E/F
    r"|NCCL.*(?:WARN|[Ee]rror|[Ff]ail|[Tt]ime(?:d ?)?out|[Aa]bort)")
"""A line of a worker's output that says something failed: shown by a quiet job (`forwarded_lines`)."""
BLOCK_STARTS = ("Traceback (most recent call last)", "Stack (most recent call first)", "Current thread 0x",
                "During handling of the above exception", "The above exception was the direct cause")
"""How a traceback (or a chained one, or faulthandler's stack of a crash) starts: shown with its indented lines."""
KNOWN_NOISE = re.compile(r"has constructor arguments in the object store and max_restarts > 0")
"""Error lines Ray writes on every run (README, "Limits"): not shown from workers."""
RAYLET_NOISE = re.compile(r"PYTHON worker processes have been started on node")
"""The raylet's warning that it started more worker processes at once than its node has CPUs: each Ray Train run
starts about nine (its controller, worker and helpers) and each job its actors, so a small machine gets it on most
runs, and it is no fault; it stays in Ray's log."""
USER_ERROR_IN_WORKER = re.compile(r"skindual\.errors\.\w+Error\b|\((?:User|Data|Storage)Error\)")
"""A worker's report of a user error: the job says it in one line (`cli.run_job`), not with the traceback."""


def forwarded_lines(lines: list[str], ours: re.Pattern) -> list[str]:
    """Of one batch of a worker's output lines, those a job shows unless --verbose: skindual's own
    (`ours`) and the worker's errors (`WORKER_ERROR`), each with the indented lines that follow it (a
    traceback's frames, a crash's stack); not the rest (Ray's and the libraries' chatter), and not the
    traceback of a user error (`USER_ERROR_IN_WORKER`), which the job reports in one line."""
    shown, blanks, block = [], [], False
    user_error = any(USER_ERROR_IN_WORKER.search(line) for line in lines)
    for line in lines:
        if block and not line.strip():
            blanks.append(line)  # kept if the block goes on (a chained traceback, a crash's stack)
            continue
        if ours.match(line):
            shown.append(line)
            block = False
        elif KNOWN_NOISE.search(line):
            block = False
        elif WORKER_ERROR.search(line) or line.startswith(BLOCK_STARTS):
            block = not user_error
            if block:
                shown += blanks + [line]
        elif block and line.startswith((" ", "\t")):
            shown += blanks + [line]
        else:
            block = False
        blanks = []
    return shown


def raylet_notes(lines: list[str]) -> list[str]:
    """Of one batch of the raylet's lines, those a job shows unless --verbose: all (a task killed for memory,
    say) but `RAYLET_NOISE`."""
    return [line for line in lines if not RAYLET_NOISE.search(line)]


def _forward_only_our_lines() -> None:
    """Of the output Ray forwards from the job's workers, show skindual's log lines (`cli.worker_setup`),
    the workers' error lines (`forwarded_lines`) and the raylet's notes (a task killed for memory, say), but not
    its count of started workers (`raylet_notes`); Ray's own actors' and libraries' other lines (the train
    controller, the placement-group cleaner, dataset coordinators, progress bars) stay in Ray's log files."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printers = [handler for name, handler in dispatcher.handlers if name == "ray_print_logs"]
    if not printers:
        return
    ours = re.compile(OUR_LINE)

    def forward(data: dict) -> None:
        lines = list(data.get("lines", []))
        lines = raylet_notes(lines) if data.get("pid") == "raylet" else forwarded_lines(lines, ours)
        if lines:
            printers[0]({**data, "lines": lines})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", forward)


# --------------------------------------------------------------------------- what the cluster can launch


@dataclass(frozen=True)
class NodeShape:
    """One kind of node the cluster has or can launch: its resources and how many of it there can be."""

    name: str
    resources: dict[str, float]
    max_count: int  # -1: no limit
    min_count: int = 0


@dataclass(frozen=True)
class ClusterShape:
    """The nodes a cluster has now (`running`, one shape each) and the node types its autoscaler can
    launch (`launchable`).

    ``autoscaler`` is ``"none"`` (a fixed cluster: what runs is all there is), ``"known"`` (its node
    types were read) or ``"unknown"`` (an autoscaler whose node types cannot be read from here)."""

    running: tuple[NodeShape, ...]
    launchable: tuple[NodeShape, ...]
    autoscaler: str

    @property
    def shapes(self) -> tuple[NodeShape, ...]:
        return self.running + tuple(s for s in self.launchable if s.max_count != 0)

    def most(self, resource: str) -> float:
        """The most of `resource` one node has or can have."""
        return max((s.resources.get(resource, 0.0) for s in self.shapes), default=0.0)

    @property
    def can_grow(self) -> bool:
        """Whether the autoscaler can add nodes (one whose node types are unknown is assumed to)."""
        if self.autoscaler == "unknown":
            return True
        return any(s.max_count < 0 or s.max_count > s.min_count for s in self.launchable)

    @property
    def multi_node(self) -> bool:
        return len(self.running) > 1 or self.can_grow

    def accelerator_types(self) -> list[str]:
        """The GPU models the cluster has or can launch (Ray's ``accelerator_type:<model>`` resources)."""
        return sorted({k[len(ACCELERATOR_PREFIX):] for s in self.shapes
                       for k, v in s.resources.items() if k.startswith(ACCELERATOR_PREFIX) and v > 0})


def _head_autoscaler(gcs_address: str) -> dict:
    """Runs on the head node: the autoscaling config of the monitor serving `gcs_address` (the
    ``--autoscaling-config`` that ``ray up`` / ``ray start --head`` passed it), as its node types."""
    import yaml

    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("monitor.py") and "autoscaler" in a for a in args):
            continue
        if f"--gcs-address={gcs_address}" not in args:
            continue
        config_path = next((a.split("=", 1)[1] for a in args if a.startswith("--autoscaling-config=")), None)
        if config_path is None:
            return {"kind": "none"}
        try:
            config = yaml.safe_load(Path(os.path.expanduser(config_path)).read_text())
        except (OSError, yaml.YAMLError):
            return {"kind": "unknown"}
        return {"kind": "known", "types": node_types(config)}
    return {"kind": "unknown"}


def node_types(config: dict) -> dict[str, dict]:
    """An autoscaling config's (cluster.yaml's) node types: per name its resources and worker counts (the head
    type adds none)."""
    default_max = int(config.get("max_workers", -1))
    return {name: {"resources": {k: float(v) for k, v in (t.get("resources") or {}).items()},
                   "max_count": 0 if name == config.get("head_node_type") else int(t.get("max_workers", default_max)),
                   "min_count": int(t.get("min_workers", 0))}
            for name, t in (config.get("available_node_types") or {}).items()}


def shape_of(running: tuple[NodeShape, ...], types: dict[str, dict]) -> ClusterShape:
    """The `ClusterShape` of `running` nodes and an autoscaler of `node_types`; a type whose resources the
    config leaves to the cloud provider to fill in makes the shape unknown."""
    launchable = tuple(NodeShape(name, t["resources"], t["max_count"], t["min_count"]) for name, t in types.items())
    unknown = any(not s.resources and s.max_count != 0 for s in launchable)
    return ClusterShape(running, launchable, "unknown" if unknown else "known")


def cluster_shape() -> ClusterShape:
    """What the connected cluster has and can launch (`ClusterShape`); Ray must be initialised."""
    import ray

    running = tuple(NodeShape(f"running:{n.get('NodeManagerAddress')}",
                              {k: float(v) for k, v in n.get("Resources", {}).items() if not k.startswith("node:")}, 1)
                    for n in ray.nodes() if n.get("Alive"))
    config = None
    try:
        from ray._private.state import state

        config = state.get_cluster_config()  # autoscaler v2 and KubeRay report their node groups here
    except Exception:  # noqa: BLE001 - an older or partial GCS: fall back to the head's monitor
        config = None
    if config is not None and config.node_group_configs:
        return ClusterShape(running, tuple(NodeShape(g.name, {k: float(v) for k, v in g.resources.items()},
                                                     int(g.max_count), int(g.min_count))
                                           for g in config.node_group_configs), "known")
    gcs = ray.get_runtime_context().gcs_address
    head = ray.remote(_head_autoscaler).options(num_cpus=0, resources={"node:__internal_head__": 0.001},
                                                max_retries=0)
    try:
        found = ray.get(head.remote(gcs), timeout=60)
    except Exception:  # noqa: BLE001 - no head task possible (e.g. a client without one): unknown
        found = {"kind": "unknown"}
    if found["kind"] != "known":
        return ClusterShape(running, (), found["kind"])
    return shape_of(running, found["types"])


def this_machine() -> ClusterShape:
    """The shape of this machine alone, for work done in this process without Ray (a bench's baseline loop)."""
    import torch

    resources = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    return ClusterShape((NodeShape("running:this machine", resources, 1),), (), "none")


def resolve_gpus(asked: float, flag: str, shape: ClusterShape) -> float:
    """A GPU count per worker: `asked` when it is 0 or more (refused if no node can ever have that
    many), else ("auto", -1) 1 when the cluster has or can launch GPU nodes and 0 when it cannot."""
    most = shape.most("GPU")
    if asked >= 0:
        if asked > most and shape.autoscaler != "unknown":
            raise UserError(f"{flag} {asked:g}: no node of this cluster has or can launch {asked:g} GPU(s) "
                            f"(the most is {most:g}); add a GPU node type to the cluster or ask for fewer")
        return float(asked)
    if most > 0:
        return 1.0
    if shape.autoscaler in ("none", "known"):
        return 0.0
    raise UserError(f"{flag} -1 (auto): this cluster has no GPU now and the node types its autoscaler can launch "
                    f"cannot be read here; give {flag} 1 (a GPU each: the autoscaler launches GPU nodes) or 0 (CPU)")


def check_accelerator(accelerator_type: str, num_gpus: float, shape: ClusterShape, flag: str = "--accelerator-type",
                      require_one: bool = False) -> str:
    """The GPU model a run's workers use: `accelerator_type` (checked against what the cluster can
    launch), else the only model the cluster offers, else ``""`` (unknown).  `require_one`: refuse a
    GPU run on a cluster offering several models without `accelerator_type` (its bytes would mix)."""
    if num_gpus <= 0:
        if accelerator_type:
            raise UserError(f"{flag} {accelerator_type}: it needs GPUs; give the GPU count too")
        return ""
    offered = shape.accelerator_types()
    if accelerator_type:
        if offered and accelerator_type not in offered:
            raise UserError(f"{flag} {accelerator_type}: this cluster has or can launch {', '.join(offered)} "
                            "only; choose one of them")
        return accelerator_type
    if len(offered) > 1 and require_one:
        raise UserError(f"this cluster has GPUs of several models ({', '.join(offered)}) and sampled bytes differ "
                        f"between models; pass {flag} with one of them so that every shard comes from one model")
    return offered[0] if len(offered) == 1 else ""


def reserved_device() -> str:
    """Inside a Ray task or actor: ``"cuda"`` when Ray reserved a GPU for it, else ``"cpu"`` (even on a
    GPU node, whose CUDA every process sees)."""
    import ray

    return "cuda" if ray.get_gpu_ids() else "cpu"


# --------------------------------------------------------------------------- where outputs may live


def shared_folders() -> list[str]:
    """The folders the user declared shared by every node (`SHARED_FS_ENV`)."""
    return [os.path.abspath(p) for p in os.environ.get(SHARED_FS_ENV, "").split(":") if p.strip()]


def _is_under(path: str, folder: str) -> bool:
    return folder == os.sep or path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def in_working_dir_copy() -> bool:
    """Whether this process runs in Ray's unpacked copy of a ``--working-dir``."""
    return WORKING_DIR_MARK in Path.cwd().as_posix()


def check_shared_paths(paths: dict[str, str], shape: ClusterShape | None) -> None:
    """Refuse a local path (flag → path) that would end up on one node only: any relative one when the
    job runs in Ray's copy of its working dir (it would be lost with it), and on a cluster of several
    nodes or one that can grow (`shape`) any that is not under a folder declared shared."""
    for flag, url in paths.items():
        text = str(url or "")
        if not text or text.startswith("s3://"):
            continue
        local = text.removeprefix("file://")
        if not os.path.isabs(os.path.expanduser(local)) and in_working_dir_copy():
            raise UserError(f"{flag} {text}: a relative path, and this job runs in Ray's copy of the working dir "
                            f"({Path.cwd()}), which is deleted with the job; give an absolute path or s3://")
        if shape is None or not shape.multi_node:
            continue
        absolute = os.path.abspath(os.path.expanduser(local))
        if any(_is_under(absolute, folder) for folder in shared_folders()):
            continue
        nodes = (f"{len(shape.running)} node{'s' * (len(shape.running) != 1)}"
                 + (" and an autoscaler that adds more" if shape.can_grow else ""))
        raise UserError(f"{flag} {text}: a local path, on a cluster of {nodes}, so it exists on one node only; use "
                        f"s3://BUCKET/... (or, if every node mounts it, list its folder in {SHARED_FS_ENV})")
