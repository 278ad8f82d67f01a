"""The Envoy config askmesh writes is valid for the real envoy and has the routing we rely on."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from askmesh import envoy
from askmesh.mesh import LocalMesh, MeshLayout, parse_replicas
from tests.fakes.certs import make_certificates


def layout(tmp_path: Path, **options: object) -> envoy.EnvoyLayout:
    mesh = MeshLayout(data_dir=tmp_path, **options)  # type: ignore[arg-type]
    mesh.service_ports["generator"] = [50063, 50073]
    return mesh.envoy_layout()


def tls_layout(tmp_path: Path) -> envoy.EnvoyLayout:
    certificates = make_certificates(tmp_path / "tls")
    return layout(tmp_path, tls_cert_file=certificates.cert_file, tls_key_file=certificates.key_file)


def test_envoy_validates_the_config(tmp_path: Path) -> None:
    path = envoy.write_config(layout(tmp_path), tmp_path / "envoy.yaml")
    envoy.validate_config(path)  # raises with Envoy's own message when invalid


def test_envoy_validates_the_config_with_tls_on_the_front_door(tmp_path: Path) -> None:
    path = envoy.write_config(tls_layout(tmp_path), tmp_path / "envoy.yaml")
    envoy.validate_config(path)  # Envoy loads the certificate and key while it validates


def manager_of(config: dict, listener_name: str) -> dict:
    listener = next(l for l in config["static_resources"]["listeners"] if l["name"] == listener_name)
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def test_the_front_door_limits_each_connection_and_envoy_sheds_load(tmp_path: Path) -> None:
    config = envoy.render(layout(tmp_path))
    front = manager_of(config, "front")
    assert front["http2_protocol_options"] == {
        "max_concurrent_streams": 100,
        "initial_stream_window_size": 65536,
        "initial_connection_window_size": 1048576,
    }
    assert front["common_http_protocol_options"]["headers_with_underscores_action"] == "REJECT_REQUEST"
    assert front["max_request_headers_kb"] == 60 and front["use_remote_address"] is True
    # Long answer streams: still only an idle timeout, no total one.
    assert front["stream_idle_timeout"] == "300s" and "request_timeout" not in front
    assert "max_stream_duration" not in str(front)
    # The internal listener serves the tiers only and is left as it was.
    assert manager_of(config, "internal")["http2_protocol_options"] == {}
    assert "use_remote_address" not in manager_of(config, "internal")

    overload = config["overload_manager"]
    monitors = {m["name"]: m["typed_config"] for m in overload["resource_monitors"]}
    connections = monitors["envoy.resource_monitors.global_downstream_max_connections"]
    assert connections["max_active_downstream_connections"] == 10_000
    assert monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"] > 0
    actions = {a["name"]: a["triggers"][0] for a in overload["actions"]}
    assert set(actions) == {"envoy.overload_actions.shrink_heap", "envoy.overload_actions.stop_accepting_requests"}
    assert all(t["name"] == "envoy.resource_monitors.fixed_heap" for t in actions.values())

    gateway = envoy.Tier("gateway", "askmesh.v1.Gateway", ["127.0.0.1:50054"], ["askmesh.v1.Gateway"])
    smaller = envoy.render(envoy.EnvoyLayout(front=[gateway], internal=[], max_downstream_connections=50))
    smaller_monitors = {m["name"]: m["typed_config"] for m in smaller["overload_manager"]["resource_monitors"]}
    assert smaller_monitors["envoy.resource_monitors.global_downstream_max_connections"] == {
        **connections,
        "max_active_downstream_connections": 50,
    }


def test_the_front_door_serves_tls_when_given_a_certificate_and_the_internal_listener_does_not(tmp_path: Path) -> None:
    config = envoy.render(tls_layout(tmp_path))
    listeners = {l["name"]: l for l in config["static_resources"]["listeners"]}
    socket = listeners["front"]["filter_chains"][0]["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    assert socket["typed_config"]["@type"].endswith("DownstreamTlsContext")
    context = socket["typed_config"]["common_tls_context"]
    assert context["alpn_protocols"] == ["h2"]
    assert context["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
    assert context["tls_certificates"] == [
        {
            "certificate_chain": {"filename": str(tmp_path / "tls" / "server.pem")},
            "private_key": {"filename": str(tmp_path / "tls" / "server-key.pem")},
        }
    ]
    assert "transport_socket" not in listeners["internal"]["filter_chains"][0]
    assert "transport_socket" not in str(envoy.render(layout(tmp_path)))


def test_tls_needs_both_a_certificate_and_a_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both a certificate file and a key file"):
        envoy.EnvoyLayout(front=[], internal=[], tls_cert_file=tmp_path / "cert.pem")


def test_envoy_rejects_a_broken_config(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("static_resources: {clusters: [{name: x, lb_policy: NOPE}]}\n")
    try:
        envoy.validate_config(path)
    except ValueError as error:
        assert "NOPE" in str(error) or "lb_policy" in str(error)
    else:
        raise AssertionError("envoy accepted a broken config")


def test_clusters_balance_least_request_with_grpc_health_checks(tmp_path: Path) -> None:
    config = envoy.render(layout(tmp_path))
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert set(clusters) == {"gateway", "embedder", "retriever", "generator", "ingestor", "web"}
    web = clusters.pop("web")  # HTTP: see test_the_http_listener_...
    assert web["lb_policy"] == "LEAST_REQUEST" and web["type"] == "EDS"
    for name, cluster in clusters.items():
        assert cluster["lb_policy"] == "LEAST_REQUEST"
        check = cluster["health_checks"][0]
        expected = "askmesh.v1.KnowledgeBases" if name == "ingestor" else f"askmesh.v1.{name.capitalize()}"
        assert check["grpc_health_check"]["service_name"] == expected
        assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])
    assert all(cluster["type"] == "EDS" and cluster["ignore_health_on_host_removal"] for cluster in clusters.values())


def test_each_tier_reads_its_replicas_from_an_endpoint_file_replaced_atomically(tmp_path: Path) -> None:
    config = envoy.render(layout(tmp_path))
    generator = next(c for c in config["static_resources"]["clusters"] if c["name"] == "generator")
    source = generator["eds_cluster_config"]["eds_config"]["path_config_source"]
    assert source["path"] == str(tmp_path / "endpoints" / "generator.yaml")
    assert source["watched_directory"]["path"] == str(tmp_path / "endpoints")

    envoy.write_config(layout(tmp_path), tmp_path / "envoy.yaml")
    first = yaml.safe_load(Path(source["path"]).read_text())
    endpoints = first["resources"][0]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [50063, 50073]

    envoy.write_endpoints(tmp_path / "endpoints", "generator", ["127.0.0.1:50083"], version=7)
    second = yaml.safe_load(Path(source["path"]).read_text())
    assert second["version_info"] == "7"
    assert (
        second["resources"][0]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"]
        == 50083
    )
    assert sorted(p.name for p in (tmp_path / "endpoints").iterdir()) == [
        "embedder.yaml",
        "gateway.yaml",
        "generator.yaml",
        "ingestor.yaml",
        "retriever.yaml",
        "web.yaml",
    ]


def test_replica_counts_are_parsed_and_bad_ones_named() -> None:
    assert parse_replicas("embedder=2, generator=3") == {"embedder": 2, "generator": 3}
    assert parse_replicas("") == {}
    for bad in ("embedder", "search=2", "generator=0", "generator=two", "gateway=99"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            parse_replicas(bad)


def test_more_than_one_retriever_runs_milvus_lite_as_a_server(tmp_path: Path) -> None:
    assert MeshLayout.with_replicas(tmp_path, {}).milvus == "embedded"
    layout = MeshLayout.with_replicas(tmp_path, {"retriever": 2, "generator": 3})
    assert layout.milvus == "server" and layout.milvus_uri == "http://127.0.0.1:19530"
    assert layout.service_ports["generator"] == [50063, 50073, 50083]


def test_each_tier_gets_its_openmp_waits_unless_the_user_set_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    single = LocalMesh(MeshLayout.with_replicas(tmp_path, {}), say=lambda _: None)
    embedder, generator, gateway = (single.service_env(tier, 0, 50100) for tier in ("embedder", "generator", "gateway"))
    # One replica spins briefly (told to sleep at once, llama.cpp made a third of the tokens).
    assert generator["GOMP_SPINCOUNT"] == "1000" and "OMP_WAIT_POLICY" not in generator
    assert embedder["GOMP_SPINCOUNT"] == "10000" and "OMP_WAIT_POLICY" not in embedder
    assert gateway["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in gateway
    # Replicas that spun would fight over the cores (two spinning generators made 0 tokens/s).
    replicated = LocalMesh(MeshLayout.with_replicas(tmp_path, {"generator": 2}), say=lambda _: None)
    assert replicated.service_env("generator", 1, 50100)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "GOMP_SPINCOUNT" not in replicated.service_env("generator", 1, 50100)
    assert replicated.service_env("embedder", 0, 50100)["GOMP_SPINCOUNT"] == "10000"

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    for tier in ("embedder", "generator", "gateway"):
        env = single.service_env(tier, 0, 50100)
        assert env["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in env


def test_streams_have_no_route_timeout_and_only_idempotent_unary_calls_retry_on_unavailable(tmp_path: Path) -> None:
    config = envoy.render(layout(tmp_path))
    routes = {}
    for listener in config["static_resources"]["listeners"]:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        assert "compressor" not in str(manager["http_filters"])  # gRPC compresses itself
        for route in manager["route_config"]["virtual_hosts"][0]["routes"]:
            routes[route["match"].get("path") or route["match"]["prefix"]] = route["route"]
    assert all(route["timeout"] == "0s" for route in routes.values())
    retried_on_unavailable = {
        key for key, route in routes.items() if "unavailable" in route.get("retry_policy", {}).get("retry_on", "")
    }
    assert retried_on_unavailable == {
        "/askmesh.v1.Embedder/Embed", "/askmesh.v1.Reranker/Rerank", "/askmesh.v1.Retriever/Search",
        "/askmesh.v1.Catalog/GetSearchView", "/askmesh.v1.Catalog/Authenticate", "/askmesh.v1.Generator/GetLoad",
        "/askmesh.v1.Gateway/Embed", "/askmesh.v1.Gateway/Search",
    }
    # Answer streams are sent again when a replica reset them before answering; uploads are not.
    retried_on_reset = {
        key for key, route in routes.items() if "reset" in route.get("retry_policy", {}).get("retry_on", "").split(",")
    }
    assert retried_on_reset == {
        "/askmesh.v1.Embedder/Embed",
        "/askmesh.v1.Reranker/Rerank",
        "/askmesh.v1.Retriever/Search",
        "/askmesh.v1.Catalog/GetSearchView",
        "/askmesh.v1.Catalog/Authenticate",
        "/askmesh.v1.Generator/GetLoad",
        "/askmesh.v1.Generator/Generate",
        "/askmesh.v1.Generator/AdmitAndGenerate",
        "/askmesh.v1.Gateway/Ask",
        "/askmesh.v1.Gateway/Embed",
        "/askmesh.v1.Gateway/Search",
    }
    assert routes["/askmesh.v1.Generator/"]["idle_timeout"] == "300s"
    # A replica's RESOURCE_EXHAUSTED goes to another replica, except the gateway's: it says
    # every generator replica was full already, and another gateway reaches the same ones.
    retried_when_full = {
        key for key, route in routes.items() if "resource-exhausted" in route.get("retry_policy", {}).get("retry_on", "")
    }
    assert "/askmesh.v1.Generator/AdmitAndGenerate" in retried_when_full
    assert not {key for key in retried_when_full if key.startswith(("/askmesh.v1.Gateway/", "/askmesh.v1.KnowledgeBases/"))}


def test_every_port_binds_to_loopback(tmp_path: Path) -> None:
    config = envoy.render(layout(tmp_path))
    addresses = [config["admin"]["address"]] + [l["address"] for l in config["static_resources"]["listeners"]]
    assert {a["socket_address"]["address"] for a in addresses} == {"127.0.0.1"}


def test_the_admin_port_stays_on_loopback_when_the_listeners_serve_every_interface(tmp_path: Path) -> None:
    config = envoy.render(layout(tmp_path, host="0.0.0.0"))
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    listeners = {l["name"]: l["address"]["socket_address"]["address"] for l in config["static_resources"]["listeners"]}
    assert listeners == {"front": "0.0.0.0", "internal": "0.0.0.0", "http": "0.0.0.0"}


def routes_of(config: dict, listener_name: str) -> list[tuple[str, str]]:
    """(path or prefix, cluster) of a listener's routes, in order, health routes left out."""
    listener = next(l for l in config["static_resources"]["listeners"] if l["name"] == listener_name)
    routes = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    return [
        (route["match"].get("path") or route["match"]["prefix"], route["route"]["cluster"])
        for route in routes
        if "headers" not in route["match"]
    ]


def first_match(routes: list[tuple[str, str]], path: str) -> str:
    """The cluster Envoy sends `path` to: the first route whose exact path or prefix matches."""
    for match, cluster in routes:
        if path == match or (match.endswith("/") and path.startswith(match)):
            return cluster
    raise AssertionError(f"no route for {path}")


def test_the_front_door_routes_each_public_service_to_its_tier_and_nothing_internal(tmp_path: Path) -> None:
    config = envoy.render(layout(tmp_path))
    front = routes_of(config, "front")
    assert first_match(front, "/askmesh.v1.Gateway/Ask") == "gateway"
    assert first_match(front, "/askmesh.v1.Gateway/Search") == "gateway"
    # AddDocuments is a Gateway method the ingestor serves: a client's address and API stay.
    assert first_match(front, "/askmesh.v1.Gateway/AddDocuments") == "ingestor"
    assert first_match(front, "/askmesh.v1.KnowledgeBases/DeleteKnowledgeBase") == "ingestor"
    assert first_match(front, "/askmesh.v1.Ingestion/UploadFile") == "ingestor"
    # Internal services are not routed to their tiers from outside (the catch-all is the
    # gateway's, which does not serve them: UNIMPLEMENTED).
    for internal in ("/askmesh.v1.Catalog/GetSearchView", "/askmesh.v1.Retriever/Delete", "/askmesh.v1.Embedder/SwapModel",
                     "/askmesh.v1.Reranker/Rerank"):
        assert first_match(front, internal) == "gateway"
    inside = routes_of(config, "internal")
    assert first_match(inside, "/askmesh.v1.Catalog/GetSearchView") == "ingestor"
    # The Reranker is a service of the embedder tier, reached like its other calls.
    assert first_match(inside, "/askmesh.v1.Reranker/Rerank") == "embedder"
    assert first_match(inside, "/askmesh.v1.Reranker/GetModel") == "embedder"
    assert first_match(inside, "/askmesh.v1.Retriever/Search") == "retriever"
    # The web tier asks and embeds there, with each caller's key; AddDocuments stays the ingestor's.
    assert first_match(inside, "/askmesh.v1.Gateway/Ask") == "gateway"
    assert first_match(inside, "/askmesh.v1.Gateway/Embed") == "gateway"
    assert first_match(inside, "/askmesh.v1.Gateway/AddDocuments") == "ingestor"
    assert first_match(inside, "/askmesh.v1.KnowledgeBases/ListKnowledgeBases") == "ingestor"


def test_the_http_listener_sends_the_api_and_the_page_to_the_web_tier_with_stream_friendly_routes(tmp_path: Path) -> None:
    config = envoy.render(layout(tmp_path))
    http = routes_of(config, "http")
    for path in ("/v1/chat/completions", "/v1/models", "/api/tasks/t1/events", "/", "/app.js"):
        assert first_match(http, path) == "web"
    manager = manager_of(config, "http")
    listener = next(l for l in config["static_resources"]["listeners"] if l["name"] == "http")
    assert listener["address"]["socket_address"]["port_value"] == 8080
    assert "compressor" not in str(manager["http_filters"])  # it would hold Server-Sent Events back
    assert manager["use_remote_address"] is True and manager["stream_idle_timeout"] == "300s"
    for route in manager["route_config"]["virtual_hosts"][0]["routes"]:
        assert route["route"]["timeout"] == "0s" and route["route"]["idle_timeout"] == "300s"
        # Retried only when the request never reached a replica: a POST is not sent twice.
        assert set(route["route"]["retry_policy"]["retry_on"].split(",")) == {
            "connect-failure", "refused-stream", "reset-before-request"
        }
    web = next(c for c in config["static_resources"]["clusters"] if c["name"] == "web")
    assert web["health_checks"][0]["http_health_check"] == {"path": "/healthz"}
    assert "grpc_health_check" not in web["health_checks"][0]
    assert "typed_extension_protocol_options" not in web  # HTTP/1.1 to uvicorn
    # Its 503s are about the tiers behind it: only connection failures eject a web replica.
    assert web["outlier_detection"]["enforcing_consecutive_5xx"] == 0
    assert web["outlier_detection"]["enforcing_consecutive_gateway_failure"] == 0
    assert web["outlier_detection"]["split_external_local_origin_errors"] is True
    # Served with TLS, as the front door, when it has a certificate; HTTP/1.1 offered too.
    tls = envoy.render(tls_layout(tmp_path))
    chain = next(l for l in tls["static_resources"]["listeners"] if l["name"] == "http")["filter_chains"][0]
    assert chain["transport_socket"]["typed_config"]["common_tls_context"]["alpn_protocols"] == ["h2", "http/1.1"]
    # A mesh without the web tier has no HTTP listener.
    assert "http" not in {l["name"] for l in envoy.render(layout(tmp_path, web=False))["static_resources"]["listeners"]}
