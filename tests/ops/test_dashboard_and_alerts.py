"""The Grafana dashboard and the Prometheus alert rules: well-formed, and every metric their
expressions name is one the services export (promtool is not assumed: the structure is checked here)."""

from __future__ import annotations

import importlib
import json
import re

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from services.common.config import PROJECT_ROOT

DASHBOARD = PROJECT_ROOT / "deploy" / "grafana" / "biogate-dashboard.json"
ALERTS = PROJECT_ROOT / "deploy" / "prometheus" / "alerts.yaml"
METRIC_MODULES = ("services.common.metrics", "services.face.metrics", "services.voice.metrics", "services.mfa.metrics",
                  "services.kiosk.metrics")

# PromQL's functions, aggregations and keywords: every other identifier left in an expression,
# once strings, label matchers, grouping lists, ranges and offsets are removed, is a metric name.
PROMQL_WORDS = frozenset("""
abs absent absent_over_time acos acosh asin asinh atan atanh avg avg_over_time bottomk ceil changes
clamp clamp_max clamp_min count count_over_time count_values cos cosh day_of_month day_of_week
day_of_year days_in_month deg delta deriv exp floor group histogram_avg histogram_count
histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum hour idelta
increase irate label_join label_replace last_over_time ln log10 log2 max max_over_time min
min_over_time minute month pi predict_linear present_over_time quantile quantile_over_time rad rate
resets round scalar sgn sin sinh sort sort_desc sqrt stddev stddev_over_time stdvar stdvar_over_time
sum sum_over_time tan tanh time timestamp topk vector year and or unless offset bool atan2 inf nan
""".split())


def metric_names(expr: str) -> set[str]:
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\boffset\s+-?\w+", "", e)
    return {w for w in re.findall(r"(?<![\w.$])[A-Za-z_:][\w:]*", e) if w.lower() not in PROMQL_WORDS}


def exported_samples() -> set[str]:
    """Every sample name the services' metrics expose (counters' _total, histograms' _bucket...)."""
    for module in METRIC_MODULES:
        importlib.import_module(module)
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "info": ("_info",), "summary": ("", "_sum", "_count", "_created")}
    names = set()
    for family in REGISTRY.collect():
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


def domain_families() -> set[str]:
    out = set()
    for module in METRIC_MODULES:
        for value in vars(importlib.import_module(module)).values():
            if isinstance(value, MetricWrapperBase):
                out |= {m.name for m in value.describe()}
    return out


def balanced(expr: str) -> bool:
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for c in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if c in "([{":
            stack.append(c)
        elif c in pairs and (not stack or stack.pop() != pairs[c]):
            return False
    return not stack


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"} and doc["groups"], "a rule file holds a non-empty list of groups"
    out = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"] and group["rules"]
        out += group["rules"]
    return out


def dashboard_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_the_extraction_finds_metric_names_and_only_them():
    expr = ('histogram_quantile(0.99, sum by (le, service) (rate(biogate_rpc_seconds_bucket{method!~"A|B"}[5m] '
            'offset 1d))) > 2 and on (service) up{job="x"} / scalar(sum(foo:bar[$__rate_interval])) > 1e3')
    assert metric_names(expr) == {"biogate_rpc_seconds_bucket", "up", "foo:bar"}


def test_every_metric_the_alerts_use_is_exported(rules):
    exported = exported_samples()
    used = {name for r in rules for name in metric_names(r["expr"])}
    assert used, "the rules name no metric"
    assert used - exported == set(), f"not exported by the services: {sorted(used - exported)}"


def test_every_metric_the_dashboard_uses_is_exported(dashboard):
    exported = exported_samples()
    used = {name for e in dashboard_exprs(dashboard) for name in metric_names(e)}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            used |= set(re.findall(r"label_values\((\w+)", var["definition"]))
    assert used - exported == set(), f"not exported by the services: {sorted(used - exported)}"


def test_the_dashboard_shows_every_domain_metric(dashboard):
    text = " ".join(dashboard_exprs(dashboard))
    missing = {f for f in domain_families() if not re.search(rf"\b{f}(_total|_bucket|_sum|_count|_info)?\b", text)}
    assert missing == set(), f"metrics with no panel: {sorted(missing)}"


def test_the_alert_rules_are_well_formed(rules):
    names = [r.get("alert") for r in rules]
    assert all(isinstance(n, str) and re.fullmatch(r"Biogate[A-Z][A-Za-z0-9]+", n) for n in names), names
    assert len(set(names)) == len(names), "alert names are unique"
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, r["alert"]
        assert isinstance(r["expr"], str) and balanced(r["expr"]), f"{r['alert']}: unbalanced expression"
        assert "for" not in r or re.fullmatch(r"\d+[smhd]", r["for"]), r["alert"]
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        kept = {label for group in re.findall(r"\bby\s*\(([^)]*)\)", r["expr"])
                for label in re.split(r"\s*,\s*", group.strip())}
        for text in r["annotations"].values():
            assert set(re.findall(r"\$labels\.(\w+)", text)) <= kept, f"{r['alert']}: names a label its expression drops"


def test_the_alerts_cover_the_operational_risks(rules):
    exprs = {r["alert"]: r["expr"] for r in rules}

    def alerting_on(metric: str) -> list[str]:
        return [a for a, e in exprs.items() if metric in metric_names(e)]

    assert alerting_on("biogate_mfa_breaker_state")
    assert any('outcome=~"deny|review"' in exprs[a] for a in alerting_on("biogate_mfa_decisions_total"))
    assert alerting_on("biogate_face_liveness_refusals_total") and alerting_on("biogate_voice_spoof_refusals_total")
    assert any("histogram_quantile(0.5" in exprs[a] for a in alerting_on("biogate_similarity_score_bucket"))
    assert any("RESOURCE_EXHAUSTED" in exprs[a] for a in alerting_on("biogate_rpc_total"))
    assert any("histogram_quantile(0.99" in exprs[a] for a in alerting_on("biogate_rpc_seconds_bucket"))
    assert any('outcome="failed"' in exprs[a] for a in alerting_on("biogate_pkcs11_reconnects_total"))
    assert alerting_on("biogate_pkcs11_key_failures_total")
    assert alerting_on("biogate_verify_limited_total")
    # spraying: failures as a share of the verifications answered, not a count alone
    assert any("biogate_rpc_total" in metric_names(exprs[a]) for a in alerting_on("biogate_verify_failures_total"))


def test_the_dashboard_is_well_formed(dashboard):
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids), "panel ids are unique"
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["w"] >= 1 and g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] >= 1, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert balanced(t["expr"]) and metric_names(t["expr"]), f"{p['title']}: {t['expr']}"
            assert set(re.findall(r"\$(\w+)", t["expr"])) <= set(variables) | {"__rate_interval"}, p["title"]
