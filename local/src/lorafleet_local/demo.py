"""The demo (`lorafleet-local demo`, `make demo`): feedback that visibly changes a real model.

It starts the control plane (or uses KUBECONFIG), installs the chart with Helm and applies the
example pool and adapters: `builtin:smollm2` (SmolLM2-135M-Instruct) on two CPU trainer pods. Each
example adapter has a feedback goal (examples/goals, each a goal suite of examples/eval). Through the
trainer's HTTP API at each adapter's `status.endpoint` the demo shows the teacher preview (would the
teacher follow the feedback at all?), judges the adapter's answers to held-out questions it never
trains on (goal followed, fact kept, degenerate), trains every adapter with SDPO steps on fresh
rollouts of its current version (the two pods in parallel, a line per step), and judges again; the
summary says "achieved" only when the goal is met on held-out questions with the facts kept. Then
the loop closes: the example vLLM Deployment starts (vLLM's CPU build, serving the same model; it
starts once training is done, so it does not compete for the two cores), the trainers load every
adapter's latest version into it, and the first held-out question to vLLM through each adapter's
served name gives the trainer's answer, at the trainer's version. Then the gateway, the one door a
user needs: a chat with bob through it (which version answered is in its headers), feedback on that
answer in CLaaS's shape, text only (the gateway builds the step from its record of the chat), and
the next chat answered by the new version. Then `kubectl get`, the cache
figures from a real Prometheus, a delete that evicts the adapter's cache entry and unloads it from
vLLM, the summary table with the learning curves saved as a PNG, and teardown.

    lorafleet-local demo [--model builtin:smollm2] [--steps N] [--workdir DIR]
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafleet_local import evaluating, goals, pod_runner
from lorafleet_local.fleet import EXAMPLES, POOL, Fleet, pool_manifest
from lorafleet_local.kube import Kube
from lorafleet_local.polling import eventually

NAMESPACE = "lorafleet-demo"
ADAPTERS = ("alice", "bob", "carol")
EVICTED = "bob"
MODEL = "builtin:smollm2"
STAGES = 12
VLLM_READY_S = 1800  # vLLM's first start on a 2-core machine takes minutes
JUDGE_EVERY = 4  # held-out answers judged every this many steps, for the learning curves


class Display:
    """Numbered stages with elapsed time; lines from several threads never interleave."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.stage = 0
        self.lock = threading.Lock()

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.start:6.1f}s"

    def section(self, title: str) -> None:
        self.stage += 1
        self.out(f"\n[{self.stage}/{STAGES}] {self.elapsed()}  {title}")

    def line(self, text: str) -> None:
        self.out(f"        {text}")

    def out(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)


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

    eventually("every example adapter to be Ready", all_ready, timeout=300, interval=1.0)


def quoted(text: str, width: int = 96) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def by_pod(fleet: Fleet) -> list[list[str]]:
    """The example adapters grouped by the pod they are placed on."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in ADAPTERS:
        groups[fleet.adapter(name)["status"]["pod"]].append(name)
    return list(groups.values())


def per_pod(fleet: Fleet, work: Callable[[list[str]], None]) -> None:
    """work(names) for each pod's adapters, the pods at the same time; the first error is raised."""
    errors: list[BaseException] = []

    def guarded(names: list[str]) -> None:
        try:
            work(names)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(names,)) for names in by_pod(fleet)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def ask_before(
    fleet: Fleet, show: Display, urls: dict[str, str], steps: int | None
) -> dict[str, goals.GoalRun]:
    """Each adapter's teacher preview, and its held-out answers before training, judged."""
    runs: dict[str, goals.GoalRun] = {}

    def ask(names: list[str]) -> None:
        for name in names:
            goal = goals.Goal.of(name)
            if steps is not None:
                goal = dataclasses.replace(goal, steps=steps)
            run = goals.GoalRun(goal, preview=goals.preview(fleet.call, urls[name], goal))
            run.checkpoints.append(goals.judge(fleet.call, urls[name], goal, 0))
            runs[name] = run
            suite = goal.suite
            lines = [
                f"{name:<6} goal:     {suite.name} ({suite.kind}), feedback {suite.feedback!r}",
                *(f"       {line}" for line in goals.preview_lines(run.preview)),
                f"       held-out: {len(suite.held_out)} questions it never trains on;"
                f" {goals.describe(run.before)}",
                f"       asked:    {suite.held_out[0].question!r}",
                f"       answer:   {quoted(run.before.answers[0])}",
            ]
            show.out("\n".join(f"        {line}" for line in lines))

    per_pod(fleet, ask)
    return runs


def train(fleet: Fleet, show: Display, urls: dict[str, str], runs: dict[str, goals.GoalRun]) -> None:
    """Every adapter's steps, fresh rollouts each; adapters on different pods train at the same time."""
    total = sum(run.goal.steps for run in runs.values())
    done = [0]

    def steps(names: list[str]) -> None:
        # Round robin over the pod's adapters: each step finds its adapter in the CPU cache.
        for index in range(1, max(runs[n].goal.steps for n in names) + 1):
            for name in names:
                run = runs[name]
                if index > run.goal.steps:
                    continue
                answer = goals.step(fleet.call, urls[name], run)
                judged = ""
                if index % JUDGE_EVERY == 0 and index < run.goal.steps:
                    run.checkpoints.append(goals.judge(fleet.call, urls[name], run.goal, index))
                    judged = f"  held-out: {goals.describe(run.checkpoints[-1])}"
                with show.lock:
                    done[0] += 1
                    count = done[0]
                show.line(
                    f"[{count:3d}/{total}] {name:<6} v{answer['version']:<3} {answer['cache']:<4} "
                    f"distill loss {run.losses[-1]:.4f}  rollouts {run.rollout_ms[-1] / 1000:4.1f} s"
                    f"  step {run.step_ms[-1] / 1000:4.1f} s{judged}"
                )

    per_pod(fleet, steps)


def ask_after(
    fleet: Fleet, show: Display, urls: dict[str, str], runs: dict[str, goals.GoalRun]
) -> list[goals.GoalRun]:
    def ask(names: list[str]) -> None:
        for name in names:
            run = runs[name]
            run.checkpoints.append(goals.judge(fleet.call, urls[name], run.goal, run.goal.steps))

    per_pod(fleet, ask)
    for name in ADAPTERS:
        run = runs[name]
        show.line(f"{name:<6} held-out, before: {goals.describe(run.before)}")
        show.line(f"       held-out, after:  {goals.describe(run.after)}  (v{run.version})")
        shown = zip(run.goal.suite.held_out[:3], run.before.answers[:3], run.after.answers[:3], strict=True)
        for question, before, after in shown:
            show.line(f"       asked:  {question.question!r}")
            show.line(f"       before: {quoted(before)}")
            show.line(f"       after:  {quoted(after)}")
    return [runs[name] for name in ADAPTERS]


def vllm_urls(fleet: Fleet) -> list[str]:
    """Where this machine reaches the pods of the example vLLM Deployment."""
    pods = fleet.kube.get("pods", "-n", NAMESPACE, "-l", "app=vllm")["items"]
    return [fleet.kube.reach(NAMESPACE, p["metadata"]["name"], 8000) for p in pods]


def serve(fleet: Fleet, show: Display, runs: list[goals.GoalRun]) -> None:
    """The example vLLM Deployment: wait for it, then ask it what each adapter's trainer answered."""
    kube = fleet.kube
    start = time.monotonic()
    kube.apply(EXAMPLES / "vllm.yaml", namespace=NAMESPACE)
    show.line("kubectl apply -f examples/vllm.yaml  (vLLM's CPU build; its first start takes minutes)")
    kube.kubectl(
        "wait", "deployment/vllm", "-n", NAMESPACE, "--for=condition=Available", f"--timeout={VLLM_READY_S}s",
        timeout=VLLM_READY_S + 60,
    )  # fmt: skip
    show.line(f"{show.elapsed()}  vLLM Ready after {time.monotonic() - start:.0f} s")
    (server,) = vllm_urls(fleet)
    for run in runs:
        name = run.goal.adapter

        def served(name: str = name, version: int = run.version) -> dict[str, object] | None:
            status = fleet.adapter(name).get("status") or {}
            versions = [s.get("version") for s in status.get("served") or []]
            return status if versions and all(v == version for v in versions) else None

        status = eventually(f"{name} v{run.version} served by vLLM", served, timeout=120, interval=1.0)
        suite = run.goal.suite
        body = {"model": status["servedName"], "messages": suite.messages(suite.held_out[0].question),
                "max_tokens": suite.max_tokens, "temperature": 0.0}  # fmt: skip
        code, answer = fleet.call("POST", server + "/v1/chat/completions", body)
        if code != 200:
            raise RuntimeError(f"vLLM answered {code} for {name}: {answer}")
        text = answer["choices"][0]["message"]["content"]
        same = "same as the trainer's" if text == run.after.answers[0] else "differs from the trainer's"
        show.line(
            f"{name:<6} vLLM (model {status['servedName']!r}, v{run.version}): {quoted(text)}  ({same})"
        )
        run.served = text


GATEWAY_PORT = 8090  # the chart's gateway.port
VERSION_HEADER = "X-LoraFleet-Adapter-Version"  # the gateway's answer: which version answered


def _post_json(url: str, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The decoded answer and the version header (empty when there is none)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read()), response.headers.get(VERSION_HEADER, "")
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST {url}: {exc.code} {exc.read().decode(errors='replace')}") from None


def through_the_gateway(fleet: Fleet, show: Display, run: goals.GoalRun) -> None:
    """Chat with ``run``'s adapter through the chart's gateway, send CLaaS-shaped feedback on the
    answer (text only: the gateway builds the step from its record of that chat), and chat again:
    the new version answers. ``run.version`` follows the step."""
    kube, name, suite = fleet.kube, run.goal.adapter, run.goal.suite
    pods = kube.get("pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=gateway")["items"]
    if not pods:
        show.line("skipped: the release runs no gateway (gateway.enabled=false)")
        return
    gateway = kube.reach(NAMESPACE, pods[0]["metadata"]["name"], GATEWAY_PORT)
    served = fleet.adapter(name)["status"]["servedName"]
    question = suite.held_out[1].question
    chat = {"model": served, "messages": suite.messages(question), "max_tokens": suite.max_tokens,
            "temperature": 0.0}  # fmt: skip
    show.line(f"gateway {pods[0]['metadata']['name']}: POST /v1/chat/completions model={served!r}")
    answer, answered_by = _post_json(gateway + "/v1/chat/completions", chat)
    text = answer["choices"][0]["message"]["content"]
    show.line(f"{name:<6} v{answered_by}: {quoted(text)}")
    feedback = {"lora_id": f"{NAMESPACE}/{name}", "prompt": question, "response": text,
                "feedback": suite.feedback}  # fmt: skip
    show.line(f"POST /v1/feedback  (CLaaS's body: lora_id, prompt, response, feedback {suite.feedback!r})")
    stepped, _ = _post_json(gateway + "/v1/feedback", feedback)
    version = int(stepped["version"])
    how = ", ".join(stepped["results"][0]["samples"])
    show.line(f"{show.elapsed()}  stepped to v{version} on {name}'s trainer (sample from {how})")
    again, answered_by = _post_json(gateway + "/v1/chat/completions", chat)
    if answered_by != str(version):
        raise RuntimeError(f"the chat after the step was answered by v{answered_by}, not v{version}")
    show.line(f"{name:<6} v{version}: {quoted(again['choices'][0]['message']['content'])}")
    run.version = version


def wait_versions(fleet: Fleet, show: Display, runs: list[goals.GoalRun]) -> None:
    """The operator copies each adapter's version into its status on its resync; wait for that."""

    def reported() -> bool:
        return all(fleet.adapter(r.goal.adapter)["status"].get("version") == r.version for r in runs)

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
    for server in vllm_urls(fleet):
        _, models = fleet.call("GET", server + "/v1/models")
        loaded = sorted(m["id"] for m in (models or {}).get("data", []) if m.get("parent"))
        show.line(f"adapters vLLM serves now: {loaded}")
    since = time.time()
    fleet.scraped("sum(lorafleet_trainer_cache_entries)", since)
    for series in fleet.prometheus.query("sum by (reason) (lorafleet_trainer_cache_evictions_total) > 0"):
        show.line(f"evictions{{reason={series['metric'].get('reason')}}} = {series['value'][1]}")


def summary(show: Display, runs: list[goals.GoalRun]) -> None:
    """Judged by behaviour on held-out questions, never by the loss: "achieved" only when the goal
    is followed with the facts kept and no breakdown."""
    show.line(
        f"{'adapter':<8}{'goal':<18}{'steps':>5}  {'distill loss':<17}{'follows':<12}{'facts kept':<12}"
        f"{'degenerate':<12}{'achieved':<10}vLLM"
    )
    for run in runs:
        b, a = run.before, run.after
        loss = f"{run.losses[0]:.4f} → {run.losses[-1]:.4f}" if run.losses else "-"
        vllm = "-" if not run.served else "same answer" if run.served == a.answers[0] else "differs"
        show.line(
            f"{run.goal.adapter:<8}{run.goal.suite.name + ' (' + run.goal.suite.kind + ')':<18}"
            f"{len(run.losses):>5}  {loss:<17}{goals.pct(b.follow) + ' → ' + goals.pct(a.follow):<12}"
            f"{goals.pct(b.facts) + ' → ' + goals.pct(a.facts):<12}"
            f"{goals.pct(b.degenerate) + ' → ' + goals.pct(a.degenerate):<12}"
            f"{'yes' if run.achieved else 'no':<10}{vllm}"
        )
    missed = [r.goal.adapter for r in runs if not r.achieved]
    if missed:
        show.line(f"not achieved on held-out questions: {', '.join(missed)} (whatever the loss did)")
    steps = [ms for run in runs for ms in run.step_ms]
    rolls = [ms for run in runs for ms in run.rollout_ms]
    if steps:
        show.line(
            f"mean step {sum(steps) / len(steps) / 1000:.1f} s and rollouts"
            f" {sum(rolls) / len(rolls) / 1000:.1f} s per step, over {len(steps)} steps"
        )
    # Kept after the demo's scratch directory is gone.
    png = Path("demo-results") / "learning-curves.png"
    evaluating.plot([evaluating.Result("demo", run) for run in runs], png)
    show.line(f"learning curves (follow-rate and facts kept against steps): {png.resolve()}")


def run(workdir: Path, model: str, steps: int | None) -> None:
    show = Display()
    show.section(
        "starting the local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager)"
    )
    kube = Kube.start(workdir)
    fleet: Fleet | None = None
    try:
        show.line(f"KUBECONFIG={kube.kubeconfig}")
        show.section(f"helm install lorafleet charts/lorafleet --namespace {NAMESPACE}")
        # Statuses polled every 5 s rather than 30: the serving stage waits for status.served.
        fleet = Fleet.install(kube, NAMESPACE, workdir, "operator.resyncSeconds=5")
        show.line(
            f"operator {fleet.operator_pod}: ServiceAccount {fleet.operator()['spec']['serviceAccountName']}"
        )
        show.section(f"kubectl apply -f examples/pool.yaml -f examples/adapters.yaml  ({model}, 2 CPU pods)")
        kube.apply(pool_manifest(model), namespace=NAMESPACE)
        # Adapters go to Ready pods: with both pods up they spread, and the two train side by side.
        # On a fresh machine each pod first converts the model into the model cache.
        kube.kubectl(
            "wait", f"trainerpool/{POOL}", "-n", NAMESPACE, "--for=condition=Ready", "--timeout=900s",
            timeout=960,
        )  # fmt: skip
        show.line(f"{show.elapsed()}  trainerpool/{POOL} Ready")
        kube.apply(EXAMPLES / "adapters.yaml", namespace=NAMESPACE)
        wait_ready(kube, show)
        fleet.refresh_targets()
        urls = {name: fleet.adapter_url(name) for name in ADAPTERS}
        show.section("before training: each adapter's feedback goal and its answer to a held-out question")
        started = ask_before(fleet, show, urls, steps)
        reads_before = fleet.scraped("sum(lorafleet_trainer_storage_read_bytes_total)", time.time())
        show.section("training: SDPO steps on each adapter's rollouts and feedback (the pods in parallel)")
        train(fleet, show, urls, started)
        reads_after = fleet.scraped("sum(lorafleet_trainer_storage_read_bytes_total)", time.time())
        show.section("after training: the same held-out questions")
        runs = ask_after(fleet, show, urls, started)
        show.section("serving: vLLM loads every adapter's latest version and answers with it")
        if model != MODEL:
            show.line(f"skipped: examples/vllm.yaml serves {MODEL}, not {model}")
        elif kube.local and not (pod_runner.VLLM_VENV / "bin" / "python").exists():
            show.line(f"skipped: no vLLM virtualenv at {pod_runner.VLLM_VENV} (`make vllm` makes it)")
        else:
            serve(fleet, show, runs)
        show.section("the gateway: chat, CLaaS feedback on the answer, the next chat by the new version")
        if run_served := next((r for r in runs if r.goal.adapter == EVICTED and r.served), None):
            through_the_gateway(fleet, show, run_served)
        else:
            show.line("skipped: no vLLM serves the adapters (see the serving stage)")
        show.section("kubectl get trainerpools,loraadapters")
        wait_versions(fleet, show, runs)
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
        show.line(f"adapter storage bytes read (all calls)   {total_reads:.0f}")
        show.line(f"adapter storage bytes read (training)    {reads_after - reads_before:.0f}")
        for series in fleet.prometheus.query("lorafleet_trainer_cache_entries"):
            show.line(f"cache entries on {series['metric'].get('pod'):<12}            {series['value'][1]}")
        show.section(f"kubectl delete loraadapter {EVICTED}: it leaves vLLM and the trainer's cache")
        evict(fleet, show)
        show.section("summary")
        summary(show, runs)
    finally:
        show.out(f"\n        {show.elapsed()}  tearing down")
        if fleet is not None:
            fleet.uninstall()
        kube.stop()
    show.out(f"\ndemo finished in {show.elapsed().strip()} (pool {POOL}, namespace {NAMESPACE})")


def main(model: str, steps: int | None, workdir: Path | None) -> int:
    """Run the demo; logs stay in ``workdir`` if given (a temporary directory is removed)."""
    scratch = workdir or Path(tempfile.mkdtemp(prefix="lorafleet-demo-"))
    try:
        run(scratch, model, steps)
    except Exception as exc:
        print(f"\ndemo failed: {exc}\nlogs: {scratch}", file=sys.stderr, flush=True)
        return 1
    if workdir is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0
