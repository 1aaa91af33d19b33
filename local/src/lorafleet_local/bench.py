"""Figures of LoraFleet on the local control plane, measured as a user would time them.

`kubectl apply` to Ready for 1 and for 50 adapters, `kubectl delete` to the cache entry gone from
its trainer, and the operator's resident memory with 500 adapters placed. A benchmark, not a
test: it prints figures (and writes JSON) and asserts nothing about speed.

    python -m lorafleet_local.bench [--json bench-results/e2e-scale.json] [--many 500]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lorafleet_local.fleet import POOL, Fleet, feedback_for, pool_manifest
from lorafleet_local.kube import Kube
from lorafleet_local.polling import eventually

NAMESPACE = "lorafleet-bench"
# Two pods of the example pool, with room for every adapter of the RSS figure.
MAX_PER_POD = 300


def adapters(prefix: str, count: int, start: int = 0) -> str:
    items = [
        {
            "apiVersion": "lorafleet.io/v1alpha1",
            "kind": "LoraAdapter",
            "metadata": {"name": f"{prefix}-{i:03d}", "labels": {"bench": prefix}},
            "spec": {"pool": POOL, "lora": {"rank": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]}},
        }
        for i in range(start, start + count)
    ]
    return yaml.safe_dump_all(items)


def apply_and_wait(kube: Kube, prefix: str, count: int, start: int = 0) -> float:
    """Seconds from `kubectl apply` of count adapters to all of them Ready (kubectl wait)."""
    began = time.monotonic()
    kube.apply(adapters(prefix, count, start), namespace=NAMESPACE)
    selector = f"bench={prefix}"
    kube.kubectl(
        "wait", "loraadapter", "-l", selector, "-n", NAMESPACE, "--for=condition=Ready", "--timeout=1200s",
        timeout=1300,
    )  # fmt: skip
    return time.monotonic() - began


def delete_to_evicted(fleet: Fleet, name: str) -> float:
    """Step the adapter once (so its pod caches it), then time `kubectl delete` to the entry gone."""
    code, step = fleet.call("POST", fleet.adapter_url(name) + "/distill", feedback_for("alice"))
    if code != 200:
        raise RuntimeError(f"distill {name}: {code} {step}")
    pod = fleet.adapter(name)["status"]["pod"]
    key = f"{NAMESPACE}/{name}"
    if key not in fleet.cached(pod):
        raise RuntimeError(f"{key} is not in the cache of {pod} after a step")
    began = time.monotonic()
    fleet.kube.kubectl("delete", "loraadapter", name, "-n", NAMESPACE, "--wait=false")
    eventually(
        f"{key} to leave {pod}'s cache", lambda: key not in fleet.cached(pod), timeout=120, interval=0.05
    )
    return time.monotonic() - began


def operator_rss_mib(kube: Kube, fleet: Fleet) -> float:
    assert kube.runner is not None, "RSS is read from the local operator process"
    worker = kube.runner.worker(NAMESPACE, fleet.operator_pod)
    if worker is None or worker.child is None:
        raise RuntimeError("the operator pod is not running under the pod runner")
    status = Path(f"/proc/{worker.child.pid}/status").read_text()
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss_kib / 1024


def run(workdir: Path, many: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    kube = Kube.start(workdir)
    if not kube.local:
        raise SystemExit("lorafleet_local.bench measures the local control plane; unset KUBECONFIG")
    fleet = None
    try:
        fleet = Fleet.install(kube, NAMESPACE, workdir)
        kube.apply(pool_manifest("builtin:tiny"), namespace=NAMESPACE)
        patch = json.dumps({"spec": {"maxAdaptersPerPod": MAX_PER_POD}})
        kube.kubectl("patch", "trainerpool", POOL, "-n", NAMESPACE, "--type=merge", "-p", patch)
        kube.kubectl(
            "wait", f"trainerpool/{POOL}", "-n", NAMESPACE, "--for=condition=Ready", "--timeout=600s"
        )
        figures["operator_rss_mib_0_adapters"] = round(operator_rss_mib(kube, fleet), 1)
        figures["apply_to_ready_1_adapter_s"] = round(apply_and_wait(kube, "one", 1), 2)
        figures["apply_to_ready_50_adapters_s"] = round(apply_and_wait(kube, "fifty", 50), 2)
        evictions = [delete_to_evicted(fleet, f"fifty-{i:03d}") for i in range(5)]
        figures["delete_to_evicted_median_s"] = round(statistics.median(evictions), 3)
        figures["delete_to_evicted_max_s"] = round(max(evictions), 3)
        placed = 1 + 50 - len(evictions)
        figures[f"apply_to_ready_{many - placed}_more_adapters_s"] = round(
            apply_and_wait(kube, "many", many - placed), 1
        )
        total = len(kube.get("loraadapters", "-n", NAMESPACE)["items"])
        figures["adapters"] = total
        figures[f"operator_rss_mib_{total}_adapters"] = round(operator_rss_mib(kube, fleet), 1)
    finally:
        if fleet is not None:
            fleet.uninstall()
        kube.stop()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Scale figures of LoraFleet on the local control plane.")
    parser.add_argument("--many", type=int, default=500, help="adapters for the operator RSS figure")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.many < 60 or args.many > 2 * MAX_PER_POD:
        parser.error(f"--many must be between 60 and {2 * MAX_PER_POD}")
    workdir = Path(tempfile.mkdtemp(prefix="lorafleet-bench-"))
    try:
        figures = run(workdir, args.many)
    except Exception as exc:
        print(f"bench failed: {exc}\nlogs: {workdir}", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    for name, value in figures.items():
        print(f"{name:<40} {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
