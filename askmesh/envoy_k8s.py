"""Envoy's config for Kubernetes, from the same generator as the local mesh.

`askmesh.envoy.render` writes the routes, retries, timeouts, health checks, outlier detection and
circuit breakers once; this module takes that config as it is and changes only how replicas are
found and where traffic may go:

- each tier's cluster is STRICT_DNS on the tier's headless Service (every ready pod is one A
  record; Envoy re-resolves every few seconds), instead of the local mesh's endpoint files;
- each tier gets a second cluster, `<tier>-canary`, on the headless Service of its canary
  Deployment, and every route to the tier becomes a weighted pair of the two. The weights are
  Envoy runtime keys (`askmesh.weights.<tier>` and `askmesh.weights.<tier>-canary`, 100 and 0 in
  this file), which the chart sets from `<tier>.canary.weight` in a runtime layer it passes with
  `--config-yaml`; a weight can also be changed live through Envoy's admin `/runtime_modify`.

- with `tls`, the front door speaks TLS (HTTP/2 by ALPN) with the certificate and key of a
  kubernetes.io/tls Secret mounted at TLS_DIR; the internal listener stays plaintext inside the
  cluster (its calls carry the internal token).

The files are rendered once, with placeholders where the chart puts the release's names, and
committed under helm/askmesh/files/ (a test renders them again and compares, so they cannot drift):

    python -m askmesh.envoy_k8s > helm/askmesh/files/envoy.yaml
    python -m askmesh.envoy_k8s --tls > helm/askmesh/files/envoy-tls.yaml
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from askmesh import envoy, tiers

# What the chart replaces in the file (Helm's `replace`, not `tpl`: nothing else in an Envoy
# config can be mistaken for a template).
FULLNAME = "ASKMESH_FULLNAME"
NAMESPACE = "ASKMESH_NAMESPACE"
CLUSTER_DOMAIN = "ASKMESH_CLUSTER_DOMAIN"
RUNTIME_PREFIX = "askmesh.weights"
CANARY_SUFFIX = "-canary"
# How often Envoy asks DNS for a tier's pods again (Envoy's default too): a new pod takes
# traffic within this much after it is ready; a pod leaving is taken out sooner by its failed
# health check (it turns NOT_SERVING on SIGTERM).
DNS_REFRESH = "5s"
# Envoy's admin stays inside the pod: it can drain, change weights and quit.
ADMIN_HOST = "127.0.0.1"
# Where the chart mounts the front door's TLS Secret (its tls.crt and tls.key).
TLS_DIR = "/etc/envoy/tls"


def service_host(tier: str) -> str:
    """The DNS name of a tier's headless Service, with the chart's placeholders."""
    return f"{FULLNAME}-{tier}.{NAMESPACE}.svc.{CLUSTER_DOMAIN}"


def kubernetes_layout() -> envoy.EnvoyLayout:
    """The local mesh's layout (same tiers, routes and ports), listening on every interface of
    the pod and logging access to stdout."""
    from askmesh.mesh import MeshLayout  # the mesh module starts nothing on import

    layout = MeshLayout(data_dir=Path(".askmesh")).envoy_layout()
    return replace(layout, host="0.0.0.0", access_log=Path("/dev/stdout"))


def _dns_cluster(cluster: dict[str, Any], name: str, host: str, port: int) -> dict[str, Any]:
    dns = {key: value for key, value in copy.deepcopy(cluster).items() if key != "eds_cluster_config"}
    dns.update(
        name=name,
        type="STRICT_DNS",
        dns_refresh_rate=DNS_REFRESH,
        # Pods have IPv4 addresses in most clusters; AAAA records are used where there are none.
        dns_lookup_family="V4_PREFERRED",
        load_assignment={
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}],
        },
    )
    return dns


def _weighted(route: dict[str, Any]) -> None:
    """Sends a route's traffic to its tier and the tier's canary by runtime weights."""
    name = route.pop("cluster")
    route["weighted_clusters"] = {
        "runtime_key_prefix": RUNTIME_PREFIX,
        "clusters": [{"name": name, "weight": 100}, {"name": name + CANARY_SUFFIX, "weight": 0}],
    }


def render_kubernetes(layout: envoy.EnvoyLayout | None = None, tls: bool = False) -> dict[str, Any]:
    """The bootstrap config for the chart's Envoy Deployment."""
    layout = layout or kubernetes_layout()
    if tls:
        layout = replace(layout, tls_cert_file=Path(TLS_DIR) / "tls.crt", tls_key_file=Path(TLS_DIR) / "tls.key")
    # A copy without shared objects (render reuses one route dict for several matches).
    config = json.loads(json.dumps(envoy.render(layout)))
    config["node"] = {"id": "askmesh", "cluster": "askmesh"}
    config["admin"] = {"address": {"socket_address": {"address": ADMIN_HOST, "port_value": layout.admin_port}}}
    resources = config["static_resources"]
    clusters: list[dict[str, Any]] = []
    for cluster in resources["clusters"]:
        tier = cluster["name"]
        port = tiers.default_port(tier)
        clusters.append(_dns_cluster(cluster, tier, service_host(tier), port))
        canary = tier + CANARY_SUFFIX
        clusters.append(_dns_cluster(cluster, canary, service_host(canary), port))
    resources["clusters"] = clusters
    for listener in resources["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for host in network_filter["typed_config"]["route_config"]["virtual_hosts"]:
                    for route in host["routes"]:
                        _weighted(route["route"])
    return config


def runtime_layer(weights: dict[str, int]) -> dict[str, Any]:
    """What the chart passes with `--config-yaml`: each tier's canary weight (0-100) and the
    stable weight that makes them add up to 100. Mirrors the chart's template (tested)."""
    values: dict[str, int] = {}
    for tier, weight in weights.items():
        if not 0 <= weight <= 100:
            raise ValueError(f"{tier}.canary.weight: {weight} is not within 0-100")
        values[f"{RUNTIME_PREFIX}.{tier}"] = 100 - weight
        values[f"{RUNTIME_PREFIX}.{tier}{CANARY_SUFFIX}"] = weight
    return {"layered_runtime": {"layers": [{"name": "canary-weights", "static_layer": values}, {"name": "admin", "admin_layer": {}}]}}


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(config: dict[str, Any]) -> str:
    header = "# Generated by `python -m askmesh.envoy_k8s` from askmesh/envoy.py: do not edit by hand.\n"
    return header + yaml.dump(config, Dumper=_NoAliases, sort_keys=False)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--tls"]):
        raise SystemExit("usage: python -m askmesh.envoy_k8s [--tls]")
    sys.stdout.write(dump(render_kubernetes(tls=args == ["--tls"])))


if __name__ == "__main__":
    main()
