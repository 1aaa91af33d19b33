"""Draws the README's dashboard previews from a real run: `python -m scripts.draw_previews`.

A builtin:tiny trainer with a cache that holds about three adapters trains six of them (two hot,
four cold, so the cache hits, misses and evicts by LRU; in the middle third of the run three
adapters' steps arrive at once, so some run fused), the operator's client initialises them
and evicts one now and then, and a real Prometheus scrapes both every second. Each panel of the
Trainers dashboard is then queried over the run and drawn into charts/lorafleet/dashboards/previews/.
Like render_dashboards.py it writes a committed file and is run by hand; it starts the trainer and
the operator's client with the same helpers the chart's live-dashboard test uses.
"""

from __future__ import annotations

import random
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scripts import svg_panels
from tests.chart import charting
from tests.chart.operator_side import OperatorSide
from tests.trainer.service.live import LiveTrainer, start_trainer

from lorafleet_api import wire
from lorafleet_local.prometheus import Prometheus, static_jobs

OUT = charting.CHART / "dashboards" / "previews"
TOKEN = "preview-token"
LORA = {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
ADAPTERS = [f"adapter-{i}" for i in range(6)]
WEIGHTS = [6, 4, 1, 1, 1, 1]  # two hot adapters stay cached; cold ones push each other out
STEPS = 90
BURST = 3
LABELS = {
    "lorafleet-trainer": {"namespace": "team-a", "pool": "tiny", "pod": "tiny-0", "gpu_residency": "offload"},
    "lorafleet-operator": {"namespace": "lorafleet", "pod": "lorafleet-operator-0"},
}


def sample(step: int) -> dict[str, object]:
    prompt = f"question {step}"
    response = "answer " * (1 + step % 5)
    return {
        "prompt": prompt,
        "response": response,
        "feedback": "be brief",
        "response_logprobs": [-1.0] * len(response.encode()),
        "prompt_token_ids": list(prompt.encode()),
        "response_token_ids": list(response.encode()),
        "user_prompt": prompt,
        "system_prompt": "",
    }


def adapter_bytes(workdir: Path) -> int:
    """Cache bytes of one adapter after a step, measured on a throwaway trainer."""
    probe = start_trainer(workdir / "probe", token=TOKEN)
    try:
        client = probe.client()
        client.put("/v1/adapters/probe/one", json={"lora": LORA, "epoch": 1}).raise_for_status()
        client.post("/v1/adapters/probe/one/distill", json={"samples": [sample(0)]}).raise_for_status()
        return int(client.get("/v1/cache").json()["used_bytes"])
    finally:
        probe.stop()


def workload(trainer: LiveTrainer, operator: OperatorSide) -> None:
    rng = random.Random(7)
    client = trainer.client()
    for name in ADAPTERS:
        body = wire.InitRequest.model_validate({"lora": LORA, "epoch": 1})
        operator.run(operator.client.init(trainer.base_url, "team-a", name, body))
    with ThreadPoolExecutor(max_workers=BURST) as pool:
        for step in range(STEPS):
            name = rng.choices(ADAPTERS, WEIGHTS)[0]
            if step and step % 30 == 0:
                operator.run(operator.client.evict(trainer.base_url, "team-a", name))
            # In the middle third, BURST adapters' steps arrive at once (the trainer may fuse them).
            names = rng.sample(ADAPTERS, BURST) if STEPS // 3 <= step < 2 * STEPS // 3 else [name]
            posts = [
                pool.submit(client.post, f"/v1/adapters/team-a/{n}/distill", json={"samples": [sample(step)]})
                for n in names
            ]
            for post in posts:
                post.result().raise_for_status()
            time.sleep(0.4)


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def draw(prometheus: Prometheus, start: float, end: float, note: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    # The operator's reconcile loop does not run here (no API server), so only the Trainers
    # dashboard is drawn; the Operator panels are checked by test_live_dashboards.py.
    for name in ("trainers.json",):
        board = charting.dashboard(name)
        drawn = []
        for panel in board["panels"]:
            lines = []
            for target in panel["targets"]:
                expr = charting.substitute(target["expr"].replace("$__rate_interval", "20s"))
                for series in prometheus.query_range(expr, start, end, 2):
                    points = [(float(t), float(v)) for t, v in series["values"]]
                    lines.append(svg_panels.Series(legend(target["legendFormat"], series["metric"]), points))
            drawn.append(lines)
        path = OUT / name.replace(".json", ".svg")
        path.write_text(svg_panels.dashboard_svg(board, drawn, start, end, note), encoding="utf-8")
        print(f"wrote {path}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="lorafleet-preview-") as scratch:
        workdir = Path(scratch)
        one = adapter_bytes(workdir)
        capacity = int(one * 3.5)
        trainer = start_trainer(workdir / "trainer", token=TOKEN, args=["--cache-capacity", str(capacity)])
        operator = OperatorSide(TOKEN)
        prometheus = Prometheus(workdir / "prometheus", [charting.CHART / "alerts" / "lorafleet.rules.yaml"])
        try:
            prometheus.start(
                static_jobs(
                    {
                        "lorafleet-trainer": (f"127.0.0.1:{trainer.port}", LABELS["lorafleet-trainer"]),
                        "lorafleet-operator": (f"127.0.0.1:{operator.port}", LABELS["lorafleet-operator"]),
                    }
                )
            )
            time.sleep(5)
            start = time.time()
            workload(trainer, operator)
            time.sleep(25)  # let the rate windows drain so the end of the run is visible
            end = time.time()
            note = (
                f"Drawn from a real run ({time.strftime('%Y-%m-%d', time.gmtime(end))}): "
                f"a builtin:tiny trainer on a CPU, {len(ADAPTERS)} adapters, {STEPS} rounds of steps "
                f"(the middle third {BURST} adapters' at once), "
                f"cache {capacity} B (about 3.5 adapters), "
                "scraped every 1 s by Prometheus; rates over 20 s. `python -m scripts.draw_previews`"
            )
            draw(prometheus, start - 5, end, note)
        finally:
            prometheus.stop()
            operator.close()
            trainer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
