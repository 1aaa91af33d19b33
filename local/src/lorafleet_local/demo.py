"""The demo (`lorafleet-local demo`, `make demo`): LoraFleet end to end on the local cluster.

It starts the control plane (or uses KUBECONFIG), installs the chart with Helm, applies the example
pool and adapters (builtin:tiny on two CPU pods), trains each adapter on the example feedback with a
progress display, shows `kubectl get loraadapters` and the cache figures from a real Prometheus,
deletes an adapter to show its cache entry leaving the trainer, and tears everything down.

    lorafleet-local demo [--steps N] [--workdir DIR]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from lorafleet_local.fleet import EXAMPLES, POOL, Fleet, feedback_for
from lorafleet_local.kube import Kube
from lorafleet_local.polling import eventually

NAMESPACE = "lorafleet-demo"
ADAPTERS = ("alice", "bob", "carol")
EVICTED = "bob"
STAGES = 7


class Display:
    """Numbered stages with elapsed time; a one-line progress bar when stdout is a terminal."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.stage = 0
        self.tty = sys.stdout.isatty()

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.start:6.1f}s"

    def section(self, title: str) -> None:
        self.stage += 1
        print(f"\n[{self.stage}/{STAGES}] {self.elapsed()}  {title}", flush=True)

    def line(self, text: str) -> None:
        print(f"        {text}", flush=True)

    def progress(self, done: int, total: int, text: str) -> None:
        width = 24
        filled = width * done // total
        bar = "#" * filled + "." * (width - filled)
        end = "" if self.tty and done < total else "\n"
        prefix = "\r" if self.tty else ""
        print(f"{prefix}        [{bar}] {done:3d}/{total} {text:<60}", end=end, flush=True)


def wait_ready(kube: Kube, show: Display) -> None:
    """Print each adapter's phase as it changes until all are Ready."""
    seen: dict[str, str] = {}

    def all_ready() -> bool:
        items = kube.get("loraadapters", "-n", NAMESPACE)["items"]
        for item in items:
            name, phase = item["metadata"]["name"], (item.get("status") or {}).get("phase", "-")
            if seen.get(name) != phase:
                seen[name] = phase
                pod = (item.get("status") or {}).get("pod") or ""
                show.line(f"{show.elapsed()}  {name:<6} {phase:<8} {pod}")
        return len(items) == len(ADAPTERS) and all(seen.get(n) == "Ready" for n in ADAPTERS)

    eventually("every example adapter to be Ready", all_ready, timeout=600, interval=1.0)


def train(fleet: Fleet, show: Display, steps: int) -> tuple[dict[str, float], dict[str, int]]:
    """steps rounds over every adapter; storage reads before/after the warm rounds, and versions."""
    total = steps * len(ADAPTERS)
    done = 0
    reads: dict[str, float] = {}
    versions: dict[str, int] = {}
    urls = {name: fleet.adapter_url(name) for name in ADAPTERS}
    for round_ in range(steps):
        if round_ == 1:
            # From the second round on every adapter is in its pod's cache.
            reads["before_warm"] = fleet.scraped(
                "sum(lorafleet_trainer_storage_read_bytes_total)", time.time()
            )
        for name in ADAPTERS:
            began = time.monotonic()
            code, step = fleet.call("POST", urls[name] + "/distill", feedback_for(name))
            if code != 200:
                raise RuntimeError(f"distill {name}: {code} {step}")
            done += 1
            versions[name] = int(step["version"])
            loss = step["metrics"].get("total_loss", float("nan"))
            ms = (time.monotonic() - began) * 1000
            show.progress(
                done,
                total,
                f"{name:<6} v{step['version']:<3} {step['cache']:<4} loss {loss:8.4f} {ms:6.0f} ms",
            )
    reads["after_warm"] = fleet.scraped("sum(lorafleet_trainer_storage_read_bytes_total)", time.time())
    return reads, versions


def wait_versions(fleet: Fleet, show: Display, versions: dict[str, int]) -> None:
    """The operator copies each adapter's version into its status on its resync; wait for that."""

    def reported() -> bool:
        return all(fleet.adapter(n)["status"].get("version") == v for n, v in versions.items())

    try:
        eventually("status.version to catch up", reported, timeout=60, interval=1.0)
    except TimeoutError:
        show.line("(the operator has not reported every status.version yet)")


def evict(fleet: Fleet, show: Display) -> None:
    pod = fleet.adapter(EVICTED)["status"]["pod"]
    show.line(f"cache on {pod} before: {sorted(fleet.cached(pod))}")
    start = time.monotonic()
    fleet.kube.kubectl("delete", "loraadapter", EVICTED, "-n", NAMESPACE, "--wait=false")
    key = f"{NAMESPACE}/{EVICTED}"
    eventually(f"{key} to leave the cache of {pod}", lambda: key not in fleet.cached(pod), timeout=120)
    show.line(
        f"cache on {pod} after:  {sorted(fleet.cached(pod))}  ({time.monotonic() - start:.2f} s after delete)"
    )
    eventually(
        "the LoraAdapter to go", lambda: not fleet.kube.exists("loraadapter", EVICTED, "-n", NAMESPACE)
    )
    since = time.time()
    fleet.scraped("sum(lorafleet_trainer_cache_entries)", since)
    for series in fleet.prometheus.query("sum by (reason) (lorafleet_trainer_cache_evictions_total) > 0"):
        show.line(f"evictions{{reason={series['metric'].get('reason')}}} = {series['value'][1]}")


def run(workdir: Path, steps: int) -> None:
    show = Display()
    show.section(
        "starting the local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager)"
    )
    kube = Kube.start(workdir)
    fleet: Fleet | None = None
    try:
        show.line(f"KUBECONFIG={kube.kubeconfig}")
        show.section(f"helm install lorafleet charts/lorafleet --namespace {NAMESPACE}")
        fleet = Fleet.install(kube, NAMESPACE, workdir)
        show.line(
            f"operator {fleet.operator_pod}: ServiceAccount {fleet.operator()['spec']['serviceAccountName']}"
        )
        show.section(
            "kubectl apply -f examples/pool.yaml -f examples/adapters.yaml  (builtin:tiny, 2 CPU pods)"
        )
        kube.kubectl(
            "apply", "-n", NAMESPACE, "-f", str(EXAMPLES / "pool.yaml"), "-f", str(EXAMPLES / "adapters.yaml")
        )
        wait_ready(kube, show)
        fleet.refresh_targets()
        show.section(f"training: {steps} SDPO steps per adapter on the example feedback")
        reads, versions = train(fleet, show, steps)
        show.section("kubectl get trainerpools,loraadapters")
        wait_versions(fleet, show, versions)
        for line in kube.kubectl("get", "trainerpools,loraadapters", "-n", NAMESPACE).stdout.splitlines():
            show.line(line)
        show.section("from Prometheus (scraping the trainer pods)")
        ratio = fleet.hit_ratio()
        show.line(
            f"cache hit ratio                          {ratio:.3f}"
            if ratio is not None
            else "no cache series"
        )
        total_reads = fleet.prometheus.value("sum(lorafleet_trainer_storage_read_bytes_total)") or 0.0
        show.line(f"adapter storage bytes read (all steps)   {total_reads:.0f}")
        show.line(
            f"adapter storage bytes read (warm steps)  {reads['after_warm'] - reads['before_warm']:.0f}"
        )
        for series in fleet.prometheus.query("lorafleet_trainer_cache_entries"):
            show.line(f"cache entries on {series['metric'].get('pod'):<12}            {series['value'][1]}")
        show.section(f"kubectl delete loraadapter {EVICTED}: its cache entry leaves the trainer")
        evict(fleet, show)
    finally:
        print(f"\n        {show.elapsed()}  tearing down", flush=True)
        if fleet is not None:
            fleet.uninstall()
        kube.stop()
    print(f"\ndemo finished in {show.elapsed().strip()} (pool {POOL}, namespace {NAMESPACE})", flush=True)


def main(steps: int, workdir: Path | None) -> int:
    """Run the demo; logs stay in ``workdir`` if given (a temporary directory is removed)."""
    scratch = workdir or Path(tempfile.mkdtemp(prefix="lorafleet-demo-"))
    try:
        run(scratch, steps)
    except Exception as exc:
        print(f"\ndemo failed: {exc}\nlogs: {scratch}", file=sys.stderr, flush=True)
        return 1
    if workdir is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0
