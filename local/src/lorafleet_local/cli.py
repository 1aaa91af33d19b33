"""`lorafleet-local`: run LoraFleet's local cluster as one would run kind.

    lorafleet-local up      # start the cluster in the background; prints `export KUBECONFIG=...`
    lorafleet-local up --node  # the same with a real node: a kubelet running the images (node.py)
    lorafleet-local down    # stop it and remove its directory
    lorafleet-local demo    # LoraFleet end to end on a fresh cluster of its own, then tear down

`up` starts `up --foreground` as a detached process that holds the control plane and the pod
runner, and returns once the API server serves; `down` finds that process by the pid file in the
cluster's directory and stops it (the children it started go with it). `up --foreground` runs the
same cluster in this terminal until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from lorafleet_local import control_plane, demo, evaluating, pod_runner, polling, processes
from lorafleet_local import node as node_module

PID_FILE = "pid"
UP_FILE = "up"  # written once the cluster serves: the line `up` prints


def default_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "lorafleet-local"


def running_pid(workdir: Path) -> int | None:
    """The pid of the cluster process that owns workdir, if it still runs."""
    try:
        pid = int((workdir / PID_FILE).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError):
        return None
    # A pid file outlives a killed process, and the kernel reuses pids.
    return pid if b"lorafleet_local" in cmdline and str(workdir).encode() in cmdline else None


def foreground(workdir: Path, pods: bool, real_node: bool = False) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / PID_FILE).write_text(str(os.getpid()))
    try:
        with control_plane.ControlPlane(workdir / "cluster", node=real_node) as plane:
            runner = node = None
            line = f"export KUBECONFIG={plane.kubeconfig}   # API server {plane.server}; logs in {workdir}"
            if real_node:
                node = node_module.start_for(plane, workdir / "node")
                sets = " ".join(f"--set {value}" for value in node_module.helm_values())
                line += f"\n# a real node runs the images: helm install ... {sets}"
            elif pods:
                runner = pod_runner.PodRunner(plane.kubeconfig, workdir / "pods").start()
            tmp = workdir / (UP_FILE + ".tmp")
            tmp.write_text(line + "\n")
            tmp.replace(workdir / UP_FILE)
            print(line, flush=True)
            stop.wait()
            if runner is not None:
                runner.stop()
            if node is not None:
                node.stop()
    finally:
        for name in (UP_FILE, PID_FILE):
            (workdir / name).unlink(missing_ok=True)
    return 0


def up(workdir: Path, pods: bool, timeout: float, real_node: bool = False) -> int:
    pid = running_pid(workdir)
    if pid is not None:
        print(f"a local cluster already runs in {workdir} (pid {pid}): `lorafleet-local down` first")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)  # what a cluster that was killed left behind
    argv = [sys.executable, "-m", "lorafleet_local", "up", "--foreground", "--dir", str(workdir)]
    child = processes.Child(
        "lorafleet-local",
        [*argv, *([] if pods else ["--no-pods"]), *(["--node"] if real_node else [])],
        workdir / "lorafleet-local.log",
        detached=True,
    )  # fmt: skip
    try:
        polling.eventually(
            "the local cluster to serve", (workdir / UP_FILE).exists, timeout, 0.2, child=child
        )
    except (TimeoutError, RuntimeError) as exc:
        child.stop()
        print(f"lorafleet-local up failed: {exc}", file=sys.stderr)
        return 1
    print((workdir / UP_FILE).read_text(), end="", flush=True)
    return 0


def down(workdir: Path, timeout: float) -> int:
    pid = running_pid(workdir)
    if pid is None:
        print(f"no local cluster runs in {workdir}")
    else:
        os.kill(pid, signal.SIGTERM)
        try:
            polling.eventually(f"pid {pid} to stop", lambda: running_pid(workdir) is None, timeout, 0.2)
        except TimeoutError:
            os.killpg(pid, signal.SIGKILL)  # its children get their parent-death signal
        print(f"stopped the local cluster in {workdir}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="lorafleet-local", description="Run LoraFleet on one machine, as one would run it on kind."
    )
    commands = top.add_subparsers(dest="command", required=True)
    for name, text in (("up", "start the local cluster"), ("down", "stop the local cluster")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument(
            "--dir", type=Path, default=default_dir(), help="the cluster's directory (%(default)s)"
        )
        sub.add_argument("--timeout", type=float, default=180.0, help="seconds to wait (%(default)s)")
    up_parser = commands.choices["up"]
    up_parser.add_argument("--no-pods", action="store_true", help="no pod runner: pods stay Pending")
    up_parser.add_argument("--foreground", action="store_true", help="run in this terminal until Ctrl-C")
    up_parser.add_argument(
        "--node",
        action="store_true",
        help="a real node (kubelet, containerd; needs root, `make images tools`) instead of the pod runner",
    )
    run_demo = commands.add_parser("demo", help="LoraFleet end to end on a fresh local cluster")
    run_demo.add_argument(
        "--model",
        default=demo.MODEL,
        help="the pool's base model (%(default)s; builtin:tiny: quick, learns nothing)",
    )
    run_demo.add_argument(
        "--steps", type=int, help="SDPO steps per adapter (default: each goal's, examples/goals/*.json)"
    )
    run_demo.add_argument("--workdir", type=Path, help="keep logs here (default: a temporary directory)")
    evaluating.add_arguments(
        commands.add_parser("eval", help="judge learning by held-out behaviour (make eval)")
    )
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    if args.command == "eval":
        return evaluating.run(args)
    if args.command == "demo":
        if args.steps is not None and not 1 <= args.steps <= 50:
            top.error(f"--steps must be between 1 and 50, not {args.steps}")
        return demo.main(args.model, args.steps, args.workdir)
    workdir = args.dir.resolve()
    if args.command == "down":
        return down(workdir, args.timeout)
    if args.node and args.no_pods:
        top.error("--node and --no-pods: a real node runs the pods; choose one")
    if args.foreground:
        return foreground(workdir, not args.no_pods, args.node)
    # A real node imports the images into containerd on its first run (minutes for the trainer's).
    return up(
        workdir, not args.no_pods, args.timeout if not args.node else max(args.timeout, 900.0), args.node
    )
