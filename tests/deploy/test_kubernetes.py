"""deploy/k8s: every overlay renders (`kubectl kustomize`), every object is valid against the
Kubernetes schema (kubernetes-validate's bundled schemas, offline), and the manifests agree with
the code: the ConfigMap's configuration loads through load_config, container and Service ports
are the configured ones, probes use grpc.health.v1 on the health port (the kiosk gateway: its
/healthz), every BIOGATE_* variable names a configuration field, Secrets and ConfigMaps
referenced exist or are documented external ones, resources cover the measured peak RSS, and the
network policies let only the MFA reach face and voice, and only the ingress the kiosk gateway."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from itertools import pairwise

import kubernetes_validate
import pytest
import yaml
from services.common import config as common_config
from services.common.config import PROJECT_ROOT, ServiceName
from services.settings import Settings, load_config
from services.voice.config import digit_recognisers
from tests.deploy.config_paths import names_a_setting

K8S = PROJECT_ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
SERVICES: tuple[ServiceName, ...] = ("face", "voice", "mfa")
DEPLOYMENTS = (*SERVICES, "kiosk")  # the gRPC services and the kiosk gateway (HTTP)
# Versions a bank runs: the oldest supported (native gRPC probes and the preStop sleep action need
# 1.30) and the newest schema shipped.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# Provided by the bank's PKI / cert-manager (README, "Deploying"), never committed.
EXTERNAL_SECRETS = {"biogate-tls", "biogate-mfa-client-tls", "biogate-kiosk-client-tls"}
EXTERNAL_CLAIMS = {"biogate-models", "biogate-audit-anchors"}
# Peak RSS measured per service (bench/RESULTS.md, "Peak memory" and "GPU (H100)"), in MiB.
# The kiosk gateway's, by kiosk.http.max_frames (maximum-size frames held at once; bench/RESULTS.md,
# "Kiosk gateway limits").
KIOSK_PEAK_RSS_MIB = {8: 514, 16: 770}
PEAK_RSS_MIB = {"cpu": {"face": 992, "voice": 1583, "mfa": 187}, "gpu": {"face": 3700, "voice": 2090, "mfa": 187}}


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render deploy/k8s"
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def deployment(objects, service) -> dict:
    return by_kind(objects, "Deployment")[f"biogate-{service}"]


def container(objects, service) -> dict:
    (c,) = deployment(objects, service)["spec"]["template"]["spec"]["containers"]
    return c


def configuration(objects) -> Settings:
    (cm,) = [o for o in by_kind(objects, "ConfigMap").values() if o["metadata"]["name"].startswith("biogate-config")]
    return load_config(None, **yaml.safe_load(cm["data"]["biogate.yaml"]))


def processes(c: dict, settings: Settings, service: str) -> int:
    """The worker processes a service's pod runs, each loading its own models: server.<service>.workers,
    else server.workers, from the container's environment over the configuration; 0: one per CPU of
    the pod's limit (usable_cores reads the cgroup's quota)."""
    env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    own = env.get(f"BIOGATE_SERVER__{service.upper()}__WORKERS", getattr(settings.server, service).workers)
    n = int(own if own is not None else env.get("BIOGATE_SERVER__WORKERS", settings.server.workers))
    return n or math.ceil(float(c["resources"]["limits"]["cpu"]))


def mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity) / 2**20


def test_both_overlays_exist():
    assert OVERLAYS == ["cpu", "gpu"]


def test_every_object_is_valid_against_the_kubernetes_schema(rendered):
    _, objects = rendered
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                            "NetworkPolicy", "Job", "ConfigMap", "Secret", "Namespace"}
    for obj in objects:
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)  # raises ValidationError


def test_the_validator_can_fail(rendered):
    _, objects = rendered
    broken = yaml.safe_load(yaml.safe_dump(deployment(objects, "face")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_the_configuration_loads_and_ports_and_probes_match_it(rendered):
    _, objects = rendered
    settings = configuration(objects)
    services = by_kind(objects, "Service")
    for name in SERVICES:
        endpoint = settings.endpoint(name)
        assert endpoint.host == "0.0.0.0" and endpoint.health_port
        c = container(objects, name)
        assert c["args"] == ["serve", name]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        jwks = {"jwks": settings.mfa.http.port} if name == "mfa" else {}  # relying parties fetch the keys
        assert ports == {"grpc": endpoint.port, "metrics": endpoint.metrics_port, "health": endpoint.health_port, **jwks}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == endpoint.health_port and set(c[probe]) - {"grpc"} <= {
                "periodSeconds", "failureThreshold", "timeoutSeconds", "initialDelaySeconds"}
        # readiness asks for the service by name (NOT_SERVING also while the HSM is unreachable), the
        # others for the server ("": a restart would not bring an HSM back)
        assert c["readinessProbe"]["grpc"]["service"] == f"biogate.v1.{name.capitalize()}Service"
        assert "service" not in c["startupProbe"]["grpc"] and "service" not in c["livenessProbe"]["grpc"]
        service_ports = {p["name"]: p["port"] for p in services[f"biogate-{name}"]["spec"]["ports"]}
        assert service_ports == {"grpc": endpoint.port, "metrics": endpoint.metrics_port, **jwks}
        annotations = deployment(objects, name)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(endpoint.metrics_port)
    # the MFA reaches face and voice by their Services, on their gRPC ports, with its own certificate
    biometric: tuple[ServiceName, ...] = ("face", "voice")
    for name in biometric:
        host, port = getattr(settings.clients, name).target.split(":")
        assert host.split(".")[0] == f"biogate-{name}" and int(port) == settings.endpoint(name).port
        assert getattr(settings.clients, name).cert_file is not None
    assert not settings.auth.dev_credentials and settings.server.tls.client_ca_file is not None
    assert settings.keys.backend == "pkcs11" and settings.voice.replay_store == "database"


def test_pods_never_download_models_at_run_time(rendered):
    """The images hold the registry models (Dockerfile: `biogate models fetch` at build); a pod
    reaching a public package index at start would run unreviewed files on a bank's nodes."""
    _, objects = rendered
    assert configuration(objects).models.allow_registries is False


def test_the_kiosk_gateway_serves_its_configured_ports_and_calls_the_mfa_as_its_terminal(rendered):
    _, objects = rendered
    settings = configuration(objects)
    kiosk = settings.kiosk
    c = container(objects, "kiosk")
    assert c["args"] == ["kiosk"] and kiosk.host == "0.0.0.0" and kiosk.metrics_host == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": kiosk.port, "metrics": kiosk.metrics_port}
    service_ports = {p["name"]: p["port"] for p in by_kind(objects, "Service")["biogate-kiosk"]["spec"]["ports"]}
    assert service_ports == {"http": kiosk.port, "metrics": kiosk.metrics_port}
    annotations = deployment(objects, "kiosk")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(kiosk.metrics_port)
    from services.kiosk.gateway import HEALTH

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": HEALTH, "port": kiosk.port}  # answered whatever Host names
    # the names the kiosks reach it by (the ingress keeps their Host), not the loopback defaults: any
    # other name is refused (DNS rebinding)
    from services.common.config import loopback_host

    assert kiosk.allowed_hosts and not any(loopback_host(h) for h in kiosk.allowed_hosts)
    # the peer of every connection is the ingress controller: a cap per address below the total
    # would refuse the kiosks' requests under load
    assert kiosk.http.max_connections_per_ip >= kiosk.http.max_connections
    assert c["securityContext"] == container(objects, "mfa")["securityContext"]
    assert deployment(objects, "kiosk")["spec"]["template"]["spec"]["securityContext"] == \
        deployment(objects, "mfa")["spec"]["template"]["spec"]["securityContext"]
    # the gateway's key comes from the Secret, and it reaches the MFA's Service with the
    # certificate of a principal registered as a kiosk terminal
    assert {e["name"] for e in c["env"]} == {"BIOGATE_CONFIG", "BIOGATE_KIOSK__CLIENT_KEY_SHA256"}
    host, port = kiosk.mfa_target.split(":")
    assert host.split(".")[0] == "biogate-mfa" and int(port) == settings.endpoint("mfa").port
    assert kiosk.cert_file is not None and kiosk.ca_file is not None and kiosk.tenant
    pod = deployment(objects, "kiosk")["spec"]["template"]["spec"]
    (principal,) = [p for p in settings.auth.principals if p.terminal is not None]
    assert principal.terminal is not None and principal.terminal.channel == "kiosk" and principal.tenants == [kiosk.tenant]
    assert principal.cert_subject == f"spiffe://bank-a.internal/ns/biogate/sa/{pod['serviceAccountName']}"


def test_every_environment_variable_names_a_setting_and_every_reference_exists(rendered):
    _, objects = rendered
    secrets, config_maps = by_kind(objects, "Secret"), by_kind(objects, "ConfigMap")
    settings = configuration(objects)
    pods = [d["spec"]["template"]["spec"] for d in by_kind(objects, "Deployment").values()]
    pods += [j["spec"]["template"]["spec"] for j in by_kind(objects, "Job").values()]
    pods += [c["spec"]["jobTemplate"]["spec"]["template"]["spec"] for c in by_kind(objects, "CronJob").values()]
    assert names_a_setting("BIOGATE_VOICE__REPLAY_STORE") and not names_a_setting("BIOGATE_VOICE__REPLAY_STOR")
    for pod in pods:
        for c in pod["containers"]:
            for env in c.get("env", []):
                name = env["name"]
                if name == settings.keys.pkcs11.pin_env or name == "BIOGATE_CONFIG":
                    pass
                else:
                    assert names_a_setting(name), name
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], ref
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod["volumes"]}
        for volume in pod["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["secretName"] in set(secrets) | EXTERNAL_SECRETS
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in EXTERNAL_CLAIMS
    job = by_kind(objects, "Job")["biogate-migrate"]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["biogate", "migrate"]


def test_the_migrate_job_outlasts_a_long_index_build_and_readme_waits_as_long(rendered):
    """A concurrent index build on a large table takes as long as it takes (README, "Upgrading a
    large PostgreSQL database"): the Job's deadline is a backstop, retries are safe (every file is
    re-runnable), and README's `kubectl wait` gives up no sooner than the Job does."""
    _, objects = rendered
    job = by_kind(objects, "Job")["biogate-migrate"]["spec"]
    assert job["activeDeadlineSeconds"] == 6 * 3600
    assert job["backoffLimit"] == 3
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    (wait,) = re.findall(r"^kubectl -n biogate wait --for=condition=complete job/biogate-migrate --timeout=(\d+)([smh])$",
                         readme, re.MULTILINE)
    assert int(wait[0]) * {"s": 1, "m": 60, "h": 3600}[wait[1]] == job["activeDeadlineSeconds"]
    assert "The Job's deadline (`activeDeadlineSeconds`) is 6 hours" in readme


def test_the_audit_trail_is_anchored_on_a_schedule_to_its_own_claim(rendered):
    """Without anchors outside the database a rollback to an older signed head verifies; nothing ran
    `biogate audit anchor` in a deployment."""
    _, objects = rendered
    cron = by_kind(objects, "CronJob")["biogate-audit-anchor"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"]
    assert command[:3] == ["biogate", "audit", "anchor"] and command[3] == "--to"
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == command[4])
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == "biogate-audit-anchors"


def test_the_templates_are_checked_against_the_audit_trail_on_a_schedule_and_never_attested(rendered):
    """Without the check a template put back from before a re-enrolment verifies unnoticed; attesting
    legacy templates is an operator's decision, never a schedule's."""
    _, objects = rendered
    cron = by_kind(objects, "CronJob")["biogate-audit-templates"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:3] == ["biogate", "audit", "templates"]
    assert "--attest-legacy" not in container["command"]
    assert {e["name"] for e in container["env"]} >= {"BIOGATE_STORAGE__DSN", "BIOGATE_PKCS11_PIN"}  # keys: pseudonyms


def test_the_template_check_reads_the_anchors_and_cannot_write_them(rendered):
    """Without the anchors a backup of the trail restored with its templates verifies and matches; the
    check only reads them: the claim is mounted read-only (the anchor CronJob alone writes)."""
    _, objects = rendered
    pod = by_kind(objects, "CronJob")["biogate-audit-templates"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"]
    assert "--anchors" in command, command
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == command[command.index("--anchors") + 1])
    assert mount.get("readOnly") is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"] == {"claimName": "biogate-audit-anchors", "readOnly": True}


def test_what_is_kept_past_its_retention_is_purged_on_a_schedule(rendered):
    """Nothing ran the purges in a deployment: challenges, SMS codes, rate-limit windows and MFA
    sessions grew forever (GDPR art. 5(1)(e))."""
    _, objects = rendered
    cron = by_kind(objects, "CronJob")["biogate-retention"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0 and job["activeDeadlineSeconds"] > 0
    (container,) = job["template"]["spec"]["containers"]
    assert container["command"] == ["biogate", "purge"]
    # its audit record is signed with the audit key, in the token
    assert {e["name"] for e in container["env"]} >= {"BIOGATE_STORAGE__DSN", "BIOGATE_PKCS11_PIN"}


def test_resources_cover_the_measured_peak_memory_and_gpus_are_scheduled(rendered):
    overlay, objects = rendered
    settings = configuration(objects)
    # CPU nodes run face as a worker per CPU (overlays/cpu/face-cpu.yaml); a GPU pod one process per GPU.
    assert processes(container(objects, "face"), settings, "face") == (2 if overlay == "cpu" else 1)
    for name in SERVICES:
        c, pod = container(objects, name), deployment(objects, name)["spec"]["template"]["spec"]
        requests, limits = c["resources"]["requests"], c["resources"]["limits"]
        peak = PEAK_RSS_MIB[overlay][name] * processes(c, settings, name)
        assert mib(requests["memory"]) >= peak and mib(limits["memory"]) >= 1.25 * peak, (name, requests, limits)
        gpu = overlay == "gpu" and name != "mfa"
        assert ("nvidia.com/gpu" in limits) == gpu
        if gpu:
            assert limits["nvidia.com/gpu"] == "1" and c["image"].endswith("biogate-gpu:0.1.0")
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        else:
            assert "nodeSelector" not in pod and "biogate-gpu" not in c["image"]
    c = container(objects, "kiosk")
    peak = KIOSK_PEAK_RSS_MIB[configuration(objects).kiosk.http.max_frames]
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert mib(requests["memory"]) >= peak and mib(limits["memory"]) >= 1.25 * peak and "nvidia.com/gpu" not in limits
    hpas, pdbs = by_kind(objects, "HorizontalPodAutoscaler"), by_kind(objects, "PodDisruptionBudget")
    for deployed in DEPLOYMENTS:
        assert hpas[f"biogate-{deployed}"]["spec"]["scaleTargetRef"]["name"] == f"biogate-{deployed}"
        assert hpas[f"biogate-{deployed}"]["spec"]["minReplicas"] >= 2
        assert pdbs[f"biogate-{deployed}"]["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": f"biogate-{deployed}"}


def test_only_the_mfa_reaches_face_and_voice_and_only_the_bank_reaches_the_mfa(rendered):
    _, objects = rendered
    settings = configuration(objects)
    policies = list(by_kind(objects, "NetworkPolicy").values())
    assert any(p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] for p in policies)  # default deny

    def sources(service: str, port: int) -> list[dict]:
        out = []
        for p in policies:
            selector = p["spec"]["podSelector"].get("matchLabels", {})
            applies = selector.get("app.kubernetes.io/name") == f"biogate-{service}" or \
                selector.get("app.kubernetes.io/part-of") == "biogate"
            for rule in p["spec"].get("ingress", []) if applies else []:
                if any(r["port"] == port for r in rule.get("ports", [])):
                    out += rule["from"]
        return out

    for name in ("face", "voice"):
        assert sources(name, settings.endpoint(name).port) == [
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "biogate-mfa"}}}]
    peer, kiosk = sources("mfa", settings.endpoint("mfa").port)
    assert list(peer) == ["namespaceSelector"]
    assert kiosk == {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "biogate-kiosk"}}}
    assert settings.mfa.http.host == "0.0.0.0" and sources("mfa", settings.mfa.http.port) == [peer]
    # the kiosks come through the ingress controller, whose X-Forwarded-For the gateway trusts
    (ingress,) = sources("kiosk", settings.kiosk.port)
    assert ingress == {"namespaceSelector": {"matchLabels": {"biogate.bank-a.internal/kiosk-ingress": "true"}}}
    assert settings.kiosk.forwarded_allow_ips
    metrics_ports = {name: settings.endpoint(name).metrics_port for name in SERVICES} | {
        "kiosk": settings.kiosk.metrics_port}
    for name, port in metrics_ports.items():
        assert port is not None, name
        assert sources(name, port) == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def test_the_prometheus_scrape_job_keeps_the_annotated_pods(rendered):
    _, objects = rendered
    scrape = yaml.safe_load(by_kind(objects, "ConfigMap")["biogate-prometheus-scrape"]["data"]["biogate-scrape.yaml"])
    (job,) = scrape
    keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert keep[0]["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    for name in DEPLOYMENTS:
        annotations = deployment(objects, name)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == keep[0]["regex"]


def cron_interval_s(schedule: str) -> int:
    """The longest time between two runs of a cron schedule, in seconds. The forms a schedule here
    uses: minute and hour fields of *, */N, A, A-B, A-B/N and lists of them; every day."""
    fields = schedule.split()
    assert len(fields) == 5 and fields[2:] == ["*", "*", "*"], f"{schedule!r}: a daily schedule is all this reads"

    def values(field: str, top: int) -> set[int]:
        out: set[int] = set()
        for part in field.split(","):
            span, _, step = part.partition("/")
            lo, hi = (0, top) if span == "*" else (int(span.split("-")[0]), int(span.split("-")[-1]))
            if not step and "-" not in span and span != "*":
                hi = lo
            out.update(range(lo, hi + 1, int(step or 1)))
        assert out and max(out) <= top, f"{schedule!r}: {field!r} out of range"
        return out

    runs = sorted(h * 60 + m for h in values(fields[1], 23) for m in values(fields[0], 59))
    gaps = [b - a for a, b in pairwise(runs)] + [runs[0] + 24 * 60 - runs[-1]]
    return max(gaps) * 60


def test_the_cron_reading_knows_the_forms_used():
    assert cron_interval_s("*/15 * * * *") == 900
    assert cron_interval_s("40 * * * *") == 3600
    assert cron_interval_s("5,50 * * * *") == 45 * 60
    assert cron_interval_s("0 */6 * * *") == 6 * 3600
    assert cron_interval_s("0 1-3 * * *") == 22 * 3600


def env_value(c: dict, variable: str) -> str | None:
    return next((e["value"] for e in c.get("env", []) if e["name"] == variable and "value" in e), None)


def configured_containers(objects) -> list[tuple[str, dict]]:
    """Every container that reads the ConfigMap's configuration (BIOGATE_CONFIG), by workload."""
    out = []
    for o in objects:
        spec = o.get("spec", {})
        pod = (spec.get("jobTemplate", {}).get("spec", spec)).get("template", {}).get("spec", {})
        out += [(o["metadata"]["name"], c) for c in pod.get("containers", []) if env_value(c, "BIOGATE_CONFIG")]
    return out


def test_the_anchor_cronjob_runs_well_within_the_age_verify_allows_an_unanchored_checkpoint(rendered):
    """A checkpoint waits for the anchor run after the one that missed it: at most the schedule's
    longest interval, plus the start's allowed lateness (startingDeadlineSeconds), plus the run
    itself (activeDeadlineSeconds: without one a hung run, concurrencyPolicy Forbid, stops every
    later run). All of it must stay within audit.anchor_max_age_s, as each process that checks
    anchors reads it, or every `audit verify --anchors` and the template check report a stale
    anchor; and with room for one failed run on top."""
    _, objects = rendered
    settings = configuration(objects)
    cron = by_kind(objects, "CronJob")["biogate-audit-anchor"]["spec"]
    interval = cron_interval_s(cron["schedule"])
    deadline = cron["jobTemplate"]["spec"].get("activeDeadlineSeconds")
    assert deadline and deadline < interval, "the anchor Job needs an activeDeadlineSeconds below its interval"
    worst = interval + cron.get("startingDeadlineSeconds", 0) + deadline
    checked = 0
    for workload, c in configured_containers(objects):
        own = env_value(c, "BIOGATE_AUDIT__ANCHOR_MAX_AGE_S")
        max_age = int(own) if own is not None else settings.audit.anchor_max_age_s
        assert max_age > 0 and worst + interval <= max_age, (
            f"{workload}: audit.anchor_max_age_s {max_age} s; the anchor CronJob ({cron['schedule']!r}, deadline "
            f"{deadline} s) leaves a checkpoint unanchored up to {worst} s, {worst + interval} s after one failed run")
        checked += 1
    assert checked >= len(DEPLOYMENTS) + 2  # the services, the kiosk gateway, both audit CronJobs


def cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.mark.parametrize("name", ("face", "voice"))
def test_the_autoscaler_the_cpu_reservation_and_the_worker_processes_agree(rendered, name):
    """A pod's worker processes (server.workers 0: one per CPU) and their admission slots
    (usable_cores: the cgroup's quota) are sized on its CPU limit; the scheduler reserves its
    request, and the HorizontalPodAutoscaler's utilisation is usage over the request. With a request
    below the limit the workers share fewer cores than they admit calls for on a busy node, and the
    70 % target is reached at a fraction of what the pod serves: request, limit and workers agree."""
    overlay, objects = rendered
    settings = configuration(objects)
    c = container(objects, name)
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert cores(requests["cpu"]) == cores(limits["cpu"]), (overlay, name, requests, limits)
    cpus = cores(limits["cpu"])
    assert cpus == int(cpus) >= 1  # whole cores: usable_cores rounds a fraction up
    workers = processes(c, settings, name)
    assert 1 <= workers <= cpus
    if workers > 1:  # a worker per CPU (overlays/cpu/face-cpu.yaml): every core has its process
        assert workers == cpus
    (metric,) = by_kind(objects, "HorizontalPodAutoscaler")[f"biogate-{name}"]["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    target = metric["resource"]["target"]
    # a pod never uses more than its limit: a target at or above limit/request never scales out
    assert target["type"] == "Utilization" and 50 <= target["averageUtilization"] < 100 * cpus / cores(requests["cpu"])
    # every worker loads its models (in parallel) before any turns SERVING (services/common/server/workers.py):
    # the startup probe allows the model loading, readiness asks for the service by name
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert c["readinessProbe"]["grpc"] == {"port": settings.endpoint(name).health_port,
                                           "service": f"biogate.v1.{name.capitalize()}Service"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_voice_digit_recognisers_serve_every_admitted_call(overlay, monkeypatch):
    """voice.digit_recognisers (Whisper replicas, on the CPU wherever ECAPA and AASIST run) is sized
    apart from voice.inference_workers (the micro-batchers per model on an accelerator: one on the
    GPU overlay): a process admits a call per CPU of its share (admission.slots_per_process), and
    with fewer recognisers admitted calls queue for one (~200 ms of CPU each, bench/RESULTS.md).
    The count is the service's own digit_recognisers() on the settings the pod's process reads: the
    ConfigMap, the container's environment over it, the CPU limit as its usable cores."""
    objects = render(overlay)
    c = container(objects, "voice")
    cpus = math.ceil(cores(c["resources"]["limits"]["cpu"]))
    for name in [n for n in os.environ if n.startswith("BIOGATE_")]:
        monkeypatch.delenv(name)
    for e in c.get("env", []):
        if "value" in e and e["name"] != "BIOGATE_CONFIG":  # the ConfigMap is read below
            monkeypatch.setenv(e["name"], e["value"])
    monkeypatch.setattr(common_config, "usable_cores", lambda: cpus)  # the cgroup's quota in the pod
    settings = configuration(objects)
    slots = settings.server.admission.concurrency or math.ceil(cpus / processes(c, settings, "voice"))
    assert digit_recognisers(settings) >= slots, (overlay, digit_recognisers(settings), slots)


def test_a_start_waiting_for_the_migration_lock_gives_up_within_the_startup_probe(rendered):
    """A new pod waits for `biogate migrate` (the Job) at most storage.migration_lock_wait_s, then
    exits naming the holder; past the startup probe's budget the kubelet would kill it first,
    silently, and 0 (no limit) would never say whom it waits for."""
    _, objects = rendered
    settings = configuration(objects)
    for name in SERVICES:
        c = container(objects, name)
        own = env_value(c, "BIOGATE_STORAGE__MIGRATION_LOCK_WAIT_S")
        wait = float(own) if own is not None else settings.storage.migration_lock_wait_s
        startup = c["startupProbe"]
        assert 0 < wait < startup["periodSeconds"] * startup["failureThreshold"], (name, wait, startup)


def test_every_cronjob_bounds_its_runs_and_its_late_starts(rendered):
    """With concurrencyPolicy Forbid a run that hangs holds off every later one unless the Job has a
    deadline; and a CronJob that has missed more than 100 schedules with no startingDeadlineSeconds
    stops starting altogether (the controller gives up), silently. A long run (a first purge of a
    backlog) may skip schedules, but it ends."""
    _, objects = rendered
    crons = by_kind(objects, "CronJob")
    assert len(crons) >= 3, sorted(crons)
    for name, cron in crons.items():
        spec = cron["spec"]
        interval = cron_interval_s(spec["schedule"])
        assert spec.get("concurrencyPolicy") == "Forbid", name
        late = spec.get("startingDeadlineSeconds")
        assert late and 0 < late < interval, f"{name}: startingDeadlineSeconds {late} (interval {interval} s)"
        deadline = spec["jobTemplate"]["spec"].get("activeDeadlineSeconds")
        assert deadline and 0 < deadline <= 4 * 3600, f"{name}: activeDeadlineSeconds {deadline}"
