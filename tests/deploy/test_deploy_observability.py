"""Prometheus config and alerts pass promtool; dashboard and rules use only exported metrics."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from deploy_checks import (OBSERVABILITY, PROMETHEUS_SYNTHETIC, ROOT, exported_metric_names,
                           promql_metric_names, run, tool)

PROM = OBSERVABILITY / "prometheus"
DASHBOARD = OBSERVABILITY / "grafana" / "dashboards" / "unipool-serve.json"
COMPOSE = OBSERVABILITY / "compose.yaml"
JOB = "unipool-serve"

# Grafana's variables, replaced by values Prometheus accepts when promtool parses the queries.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h",
                "$job": ".+", "$pool": ".+"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_queries(d: dict) -> list[str]:
    return [t["expr"] for p in panels(d) for t in p.get("targets", []) if t.get("expr")]


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]


# ---- the metric name list ------------------------------------------------------

def test_promql_metric_name_extraction():
    expr = ('histogram_quantile(0.99, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket'
            '{job=~"$job", model_name="a b"}[$__rate_interval]))) / ignoring(expert) group_left '
            'sum without (pool) (up offset 5m) > bool 1e-9 and on (instance) x_total')
    assert promql_metric_names(expr) == {"vllm:time_to_first_token_seconds_bucket", "up", "x_total"}


def test_vllm_names_exist_in_vllm():
    """The vllm:* names are ones vLLM 0.32 defines (counters get `_total`, histograms `_bucket`)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vLLM is not installed here")
    source = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    defined = set(re.findall(r'name="(vllm:[a-z0-9_:]+)"', source))
    for name in sorted(n for n in exported_metric_names() if n.startswith("vllm:")):
        base = re.sub(r"_(total|bucket)$", "", name)
        assert base in defined or name in defined, f"{name}: vLLM 0.32 defines no {base}"


def test_metric_name_list_is_well_formed():
    names = exported_metric_names()
    assert len(names) >= 15
    for n in names:
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", n), n
        assert n.startswith(("vllm:", "unipool_")), n


# ---- the dashboard -------------------------------------------------------------

def test_dashboard_shows_what_operators_need():
    d = dashboard()
    assert d["uid"] and d["title"]
    exprs = "\n".join(dashboard_queries(d))
    kinds = {p["type"] for p in panels(d)}
    assert {"timeseries", "heatmap", "piechart"} <= kinds
    for needle in ("vllm:request_success_total", "vllm:num_requests_running", "vllm:num_requests_waiting",
                   "vllm:kv_cache_usage_perc", "unipool_layer_load_imbalance_ratio",
                   "unipool_steering_requests_total"):
        assert needle in exprs, needle
    for metric in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket"):
        for q in ("0.5", "0.99"):
            assert re.search(rf"histogram_quantile\({q},[^\n]*{metric}", exprs), (metric, q)
    heatmap = [p for p in panels(d) if p["type"] == "heatmap"]
    assert any("unipool_expert_tokens_total" in t["expr"] for p in heatmap for t in p["targets"])
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_dashboard_uses_only_exported_metrics():
    d = dashboard()
    exported = exported_metric_names()
    used = set()
    for expr in dashboard_queries(d):
        names = promql_metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        assert names <= exported, f"{sorted(names - exported)} not exported: {expr}"
        used |= names
    for var in d["templating"]["list"]:
        query = var.get("query")
        if var["type"] == "query":
            q = query["query"] if isinstance(query, dict) else query
            m = re.fullmatch(r"label_values\(([^,]+),\s*\w+\)", q)
            assert m and m.group(1).strip() in exported, q
    assert used == exported, f"listed but never shown: {sorted(exported - used)}"


def test_dashboard_queries_parse(tmp_path):
    """promtool parses every dashboard query (as a recording rule) once Grafana's variables are filled in."""
    rules = []
    for i, expr in enumerate(dashboard_queries(dashboard())):
        for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run([tool("promtool"), "check", "rules", str(path)])
    assert f"SUCCESS: {len(rules)} rules found" in out


# ---- Prometheus ----------------------------------------------------------------

def test_prometheus_config():
    out = run([tool("promtool"), "check", "config", "prometheus.yml"], cwd=PROM)
    assert "SUCCESS" in out and "1 rule files found" in out
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # The scrape target is the compose service on the server's port.
    compose = yaml.safe_load(COMPOSE.read_text())
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["server:8000"] and "server" in compose["services"]


def test_alert_rules_check_and_unit_tests():
    out = run([tool("promtool"), "check", "rules", "alerts.yml"], cwd=PROM)
    assert "SUCCESS" in out
    run([tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=PROM)


def test_alerts_cover_the_failure_modes():
    by_name = {r["alert"]: r for r in alert_rules()}
    wanted = {
        "UnipoolEngineDown": {"up"},
        "UnipoolQueueGrowing": {"vllm:num_requests_waiting"},
        "UnipoolPoolExpertDominant": {"unipool_expert_tokens_total"},
        "UnipoolSteeringErrors": {"unipool_steering_errors_total"},
    }
    for alert, metrics in wanted.items():
        assert alert in by_name, alert
        assert metrics <= promql_metric_names(by_name[alert]["expr"]), alert
    for rule in alert_rules():
        names = promql_metric_names(rule["expr"])
        assert names <= exported_metric_names() | PROMETHEUS_SYNTHETIC, (rule["alert"], names)
        assert f'job="{JOB}"' in rule["expr"], f'{rule["alert"]} does not filter on the job'
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]


# ---- Grafana provisioning and the compose stack ----------------------------------

def test_compose_stack_is_wired():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"server", "prometheus", "grafana"} <= set(services)

    build = services["server"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).is_file()
    assert "--model" not in services["server"].get("command", []), "the CPU image's demo model"

    mounts = {}
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source, target = vol.split(":")[:2]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
                mounts[target] = (COMPOSE.parent / source).resolve()
            else:
                assert source in compose.get("volumes", {}), f"{name}: undeclared volume {source}"

    # Prometheus reads the config and the rules file the config names.
    assert mounts["/etc/prometheus/prometheus.yml"] == (PROM / "prometheus.yml").resolve()
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    for rule_file in cfg["rule_files"]:
        assert mounts[str(Path("/etc/prometheus") / rule_file)] == (PROM / rule_file).resolve()

    # Grafana: provisioning folder, and the dashboards folder where the provider looks.
    provisioning = mounts["/etc/grafana/provisioning"]
    provider = yaml.safe_load((provisioning / "dashboards" / "unipool.yml").read_text())["providers"][0]
    dash_dir = mounts[provider["options"]["path"]]
    assert (dash_dir / DASHBOARD.name).is_file()
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"].split("//")[1].split(":")[0] in services
