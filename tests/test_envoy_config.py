"""The Envoy config askmesh writes is valid for the real envoy and has the routing we rely on."""

from __future__ import annotations

from pathlib import Path

from askmesh import envoy
from askmesh.mesh import MeshLayout


def layout(tmp_path: Path) -> envoy.EnvoyLayout:
    mesh = MeshLayout(data_dir=tmp_path)
    mesh.service_ports["generator"] = [50063, 50073]
    return mesh.envoy_layout()


def test_envoy_validates_the_config(tmp_path: Path) -> None:
    path = envoy.write_config(layout(tmp_path), tmp_path / "envoy.yaml")
    envoy.validate_config(path)  # raises with Envoy's own message when invalid


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
    assert set(clusters) == {"gateway", "embedder", "retriever", "generator"}
    for name, cluster in clusters.items():
        assert cluster["lb_policy"] == "LEAST_REQUEST"
        check = cluster["health_checks"][0]
        assert check["grpc_health_check"]["service_name"] == f"askmesh.v1.{name.capitalize()}"
        assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])
    endpoints = clusters["generator"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [50063, 50073]


def test_streams_have_no_route_timeout_and_only_idempotent_unary_calls_retry_on_unavailable(tmp_path: Path) -> None:
    config = envoy.render(layout(tmp_path))
    routes = {}
    for listener in config["static_resources"]["listeners"]:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        assert "compressor" not in str(manager["http_filters"])  # gRPC compresses itself
        for route in manager["route_config"]["virtual_hosts"][0]["routes"]:
            routes[route["match"].get("path") or route["match"]["prefix"]] = route["route"]
    assert all(route["timeout"] == "0s" for route in routes.values())
    retried_on_unavailable = {key for key, route in routes.items() if "unavailable" in route.get("retry_policy", {}).get("retry_on", "")}
    assert retried_on_unavailable == {"/askmesh.v1.Embedder/Embed", "/askmesh.v1.Retriever/Search"}
    assert routes["/askmesh.v1.Generator/"]["idle_timeout"] == "300s"


def test_every_port_binds_to_loopback(tmp_path: Path) -> None:
    config = envoy.render(layout(tmp_path))
    addresses = [config["admin"]["address"]] + [l["address"] for l in config["static_resources"]["listeners"]]
    assert {a["socket_address"]["address"] for a in addresses} == {"127.0.0.1"}
