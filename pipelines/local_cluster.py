"""``lesion cluster up|down|status``: a real multi-node Ray cluster on this machine.

``lesion cluster up``: a head node and N worker nodes, each a separate ``ray start --block`` session with its
own ports, CPUs, object store and temp dir, all on 127.0.0.1. ``lesion cluster down`` ends exactly the processes
of those sessions (never ``ray stop``, which would stop every Ray on the machine). Token authentication is on
(a token is generated into ~/.ray/auth_token when there is none) unless ``RAY_AUTH_MODE=disabled`` is set, as the
tests do; a real cluster should keep it on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CLUSTER_DIR = Path(os.environ.get("LESION_CLUSTER_DIR", "/tmp/lesion-cluster"))  # short: Ray's socket paths are capped
STATE_FILE = "cluster.json"
WORKER_PORTS = 100  # ports per node for Ray's worker processes


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(preferred: int | None = None, taken: set[int] | None = None) -> int:
    """``preferred`` when it is free on 127.0.0.1, else a free port the OS picks (never one of ``taken``)."""
    taken = taken if taken is not None else set()
    if preferred and preferred not in taken and _port_free(preferred):
        taken.add(preferred)
        return preferred
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def free_port_range(count: int, taken: set[int]) -> int:
    """The first of ``count`` consecutive free ports (none in ``taken``)."""
    for start in range(20000, 60000 - count, count):
        ports = range(start, start + count)
        if not taken.intersection(ports) and all(_port_free(p) for p in ports):
            taken.update(ports)
            return start
    raise RuntimeError(f"no {count} consecutive free ports between 20000 and 60000")


def _node_ports(taken: set[int]) -> list[str]:
    """`ray start` flags giving one node ports of its own, so that several nodes share this machine."""
    first = free_port_range(WORKER_PORTS, taken)
    return [
        f"--node-manager-port={free_port(None, taken)}", f"--object-manager-port={free_port(None, taken)}",
        f"--min-worker-port={first}", f"--max-worker-port={first + WORKER_PORTS - 1}",
        f"--dashboard-agent-listen-port={free_port(None, taken)}",
        f"--dashboard-agent-grpc-port={free_port(None, taken)}",
        f"--runtime-env-agent-port={free_port(None, taken)}", f"--metrics-export-port={free_port(None, taken)}",
    ]


def _ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.is_file() else "ray"


def start_local_cluster(workers: int = 1, cpus_per_node: float = 2, head_cpus: float | None = None,
                        gpus_per_node: int = 0, object_store_mb: int = 256, state_dir: Path = CLUSTER_DIR,
                        env: dict[str, str] | None = None, timeout: float = 180) -> dict[str, Any]:
    """Start a head and ``workers`` worker nodes on 127.0.0.1 and wait until all are alive; returns the cluster state.

    Every node is ``ray start --block`` in a session of its own with its own ports, temp dir and object store;
    the state (addresses, session leaders, logs) is saved to ``state_dir/cluster.json`` for ``stop_local_cluster``.
    Linux only (Ray supports multi-node clusters on Linux).
    """
    state_dir = Path(state_dir)
    if (state_dir / STATE_FILE).is_file():
        raise RuntimeError(f"a cluster is already up ({state_dir / STATE_FILE}): `lesion cluster down` first")
    state_dir.mkdir(parents=True, exist_ok=True)
    taken: set[int] = set()
    gcs_port = free_port(6379, taken)
    dashboard_port = free_port(8265, taken)
    client_port = free_port(10001, taken)
    env = {**os.environ, **(env or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")  # no 30 s Serve drain on `down`
    env["RAY_AUTH_MODE"] = env.get("RAY_AUTH_MODE", "token")  # every node the same; token unless disabled explicitly
    if env["RAY_AUTH_MODE"] == "token" and not _token_available(env):
        subprocess.run([_ray_executable(), "get-auth-token", "--generate"], env=env, check=True,
                       stdout=subprocess.DEVNULL)  # writes ~/.ray/auth_token, read by every node and client here
    state: dict[str, Any] = {
        "auth_mode": env["RAY_AUTH_MODE"],
        "address": f"127.0.0.1:{gcs_port}",
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
        "client": f"ray://127.0.0.1:{client_port}",
        "state_dir": str(state_dir),
        "nodes": [],
    }
    object_store = str(object_store_mb * 1024**2)
    try:
        for index in range(workers + 1):
            head = index == 0
            name = "head" if head else f"worker{index}"
            temp_dir = state_dir / name
            cpus = head_cpus if head and head_cpus is not None else cpus_per_node
            # Ray advertises this machine's address for 127.0.0.1 (services.resolve_ip_for_localhost) and its
            # gRPC servers listen on all interfaces: traffic stays on this machine, but a firewall must guard it.
            args = [_ray_executable(), "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
                    f"--num-cpus={cpus:g}", f"--num-gpus={gpus_per_node}", f"--object-store-memory={object_store}",
                    "--disable-usage-stats", *_node_ports(taken)]
            if head:
                args += ["--head", f"--port={gcs_port}", f"--ray-client-server-port={client_port}",
                         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
            else:
                args += [f"--address={state['address']}"]
            log_path = state_dir / f"{name}.log"
            with open(log_path, "wb") as out:
                process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
            state["nodes"].append({"name": name, "pid": process.pid, "cpus": cpus,
                                   "temp_dir": str(temp_dir), "log": str(log_path)})
            (state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))
            _wait_for_nodes(state, index + 1, process, log_path, timeout)
    except BaseException:
        stop_local_cluster(state_dir)
        raise
    return state


def _token_available(env: dict[str, str]) -> bool:
    home = Path(env.get("HOME", str(Path.home())))
    return bool(env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") or (home / ".ray" / "auth_token").is_file())


def _alive_nodes(dashboard: str) -> int:
    from ray.util.state import list_nodes

    return len(list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False,
                          timeout=10))


def _wait_for_nodes(state: dict, count: int, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"`ray start` exited with code {process.returncode}; end of {log_path}:\n{tail}")
        try:
            if _alive_nodes(state["dashboard"]) >= count:
                return
        except Exception as exc:  # the dashboard is not up yet
            log.debug("waiting for the dashboard: %s", exc)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} Ray node(s) not alive after {timeout:.0f}s; see {log_path}")
        time.sleep(1)


def node_processes(session: int) -> list[tuple[int, str]]:
    """(pid, command name) of every process in session ``session`` (Linux /proc).

    A node started by ``start_local_cluster`` is one session: ``ray start`` leads it, and Ray's worker processes,
    which get process groups of their own, stay in it.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == session and fields[0] != "Z":  # a zombie has ended (its parent has not reaped it yet)
            found.append((int(entry.name), stat[stat.index("(") + 1 : stat.rindex(")")]))
    return found


def stop_local_cluster(state_dir: Path = CLUSTER_DIR, timeout: float = 30) -> int:
    """End every process of a cluster started by ``start_local_cluster`` (workers first); returns nodes ended.

    SIGTERM lets ``ray start --block`` stop its node; whatever is left of the node's session after ``timeout``
    (workers, jobs' processes) gets SIGKILL. Nothing outside those sessions is touched.
    """
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        return 0
    state = json.loads(path.read_text())
    ended = 0
    for node in reversed(state["nodes"]):
        session = node["pid"]
        if not node_processes(session):
            continue
        ended += 1
        try:
            os.kill(session, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while any(pid == session for pid, _ in node_processes(session)) and time.monotonic() < deadline:
            time.sleep(0.5)
        # Until the session is empty: a raylet may still be spawning a worker while its siblings are killed.
        deadline = time.monotonic() + timeout
        while (leftovers := node_processes(session)) and time.monotonic() < deadline:
            for pid, name in leftovers:
                log.info("killing %s (pid %d), left over from node %s", name, pid, node["name"])
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        try:  # reap `ray start` when this process started it
            os.waitpid(session, os.WNOHANG)
        except ChildProcessError:
            pass
    path.unlink()
    return ended


# --------------------------------------------------------------------------------------------- command line


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """Flags of ``lesion cluster``."""
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--workers", type=int, default=1, help="worker nodes besides the head (default 1)")
    parser.add_argument("--cpus-per-node", type=float, default=2, help="logical CPUs of each node (default 2)")
    parser.add_argument("--head-cpus", type=float, help="logical CPUs of the head (default --cpus-per-node)")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs of each node (default 0)")
    parser.add_argument("--object-store-mb", type=int, default=256, help="object store of each node (default 256)")
    parser.add_argument("--dir", default=str(CLUSTER_DIR),
                        help=f"state, logs and Ray temp dirs of the nodes (default {CLUSTER_DIR})")


def run_command(name: str, args: argparse.Namespace) -> int:
    """``lesion cluster up|down|status``."""
    state_dir = Path(args.dir)
    if args.action == "down":
        ended = stop_local_cluster(state_dir)
        print(f"stopped {ended} node(s)" if ended else f"no cluster recorded in {state_dir}")
        return 0
    if args.action == "status":
        path = state_dir / STATE_FILE
        if not path.is_file():
            print(f"no cluster recorded in {state_dir}")
            return 1
        state = json.loads(path.read_text())
        os.environ.setdefault("RAY_AUTH_MODE", state["auth_mode"])
        print(f"{_alive_nodes(state['dashboard'])} of {len(state['nodes'])} node(s) alive; "
              f"address {state['address']}, dashboard {state['dashboard']}")
        return 0
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # this process talks to the cluster as its nodes do
    state = start_local_cluster(workers=args.workers, cpus_per_node=args.cpus_per_node, head_cpus=args.head_cpus,
                                gpus_per_node=args.gpus_per_node, object_store_mb=args.object_store_mb,
                                state_dir=state_dir)
    cpus = sum(node["cpus"] for node in state["nodes"])
    auth = ("token (~/.ray/auth_token): export RAY_AUTH_MODE=token in shells that use the cluster"
            if state["auth_mode"] == "token" else "disabled (RAY_AUTH_MODE=disabled): anyone on this host can use it")
    print(f"Ray cluster up: head + {args.workers} worker node(s), {cpus:g} CPUs, all on this machine\n"
          f"  auth:      {auth}\n"
          f"  drivers:   export RAY_ADDRESS={state['address']}   (then `lesion run` runs on this cluster)\n"
          f"  jobs:      {state['dashboard']}\n"
          f"  submit:    ray job submit --address {state['dashboard']} --working-dir . "
          f"--runtime-env cluster/runtime_env.yaml -- lesion run --run $PWD/runs/cluster\n"
          f"  stop:      lesion cluster down" + ("" if args.dir == str(CLUSTER_DIR) else f" --dir {args.dir}"))
    return 0
