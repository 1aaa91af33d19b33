"""The alert rules, checked by promtool: the file is valid and each alert fires when it should.

alerts_test.yaml feeds synthetic series through the rules (`promtool test rules`): every alert must
fire on the failure it names, with its rendered summary, and stay quiet on a healthy neighbour.
"""

from __future__ import annotations

import yaml
from tests.chart import charting

RULES = charting.CHART / "alerts" / "lorafleet.rules.yaml"
UNIT_TESTS = charting.ROOT / "tests" / "chart" / "alerts_test.yaml"
EXPECTED_ALERTS = {
    "LoraFleetTrainerDown",
    "LoraFleetServedVersionLagging",
    "LoraFleetCacheThrashing",
    "LoraFleetCacheFullAndEvicting",
    "LoraFleetGPUMemoryNotReleased",
    "LoraFleetAdaptersNotReady",
    "LoraFleetOperatorReconcileErrors",
    "LoraFleetOperatorDown",
    "LoraFleetGatewayFeedbackFailing",
}


def alert_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"]}


def test_promtool_checks_the_rules_file() -> None:
    done = charting.promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in done.stdout


def test_the_issue_alerts_are_all_there() -> None:
    assert alert_names() == EXPECTED_ALERTS


def test_every_alert_has_a_severity_summary_and_description() -> None:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    for rule in (rule for group in groups for rule in group["rules"]):
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert rule["for"], rule["alert"]


def test_each_alert_fires_on_its_failure_and_not_on_a_healthy_pod() -> None:
    done = charting.promtool("test", "rules", str(UNIT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    tested = {
        case["alertname"]
        for test in yaml.safe_load(UNIT_TESTS.read_text(encoding="utf-8"))["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == EXPECTED_ALERTS, "every alert needs a scenario in which it fires"
