"""deploy/k8s: every manifest parses, each ClassMesh Deployment runs `classmesh serve <name>`
for a service the server knows (core/server.py SERVICES) or the gateway, every one of them
has exactly one Deployment and a Service that reaches it, and the kustomization lists every
manifest. No cluster here: the manifests are checked statically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from classmesh.core.server import SERVICES
from classmesh.gateway import parse_upstreams

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
SERVES = {*SERVICES, "gateway"}


def _docs() -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path.name} is empty"
        for doc in docs:
            assert isinstance(doc, dict) and doc.get("kind") and doc.get("apiVersion"), path.name
        out[path.name] = docs
    return out


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for docs in _docs().values() for d in docs if d["kind"] == kind]


def _classmesh_deployments() -> dict[str, dict[str, Any]]:
    """serve name -> Deployment, for Deployments of the classmesh image."""
    out: dict[str, dict[str, Any]] = {}
    for dep in _of_kind("Deployment"):
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        if not container["image"].startswith("classmesh:"):
            continue
        args = container["args"]
        assert args[:2] == ["classmesh", "serve"] and len(args) == 3, dep["metadata"]["name"]
        assert args[2] not in out, f"two Deployments serve {args[2]}"
        out[args[2]] = dep
    return out


def test_every_deployment_serves_a_known_service_and_every_service_has_one() -> None:
    deployments = _classmesh_deployments()
    assert set(deployments) <= SERVES, set(deployments) - SERVES
    assert set(deployments) == SERVES, f"no Deployment for {sorted(SERVES - set(deployments))}"


@pytest.mark.parametrize("name", sorted(SERVES))
def test_deployment_shape(name: str) -> None:
    dep = _classmesh_deployments()[name]
    spec = dep["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert dep["metadata"]["name"] == f"classmesh-{name}"
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container.get("env", [])}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    refs = [s["secretRef"]["name"] for s in container.get("envFrom", [])]
    if name == "gateway":
        # No database or Redis; every service reached at its own Service.
        assert env["CLASSMESH_GATEWAY_LISTEN"]["value"] == "0.0.0.0:8080"
        assert ports == {"http": 8080}
        assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
        upstreams = parse_upstreams(env["CLASSMESH_GATEWAY_UPSTREAMS"]["value"], SERVICES)
        assert upstreams == {short: f"classmesh-{short}:50051" for short in SERVICES}
        return
    assert "classmesh-backends" in refs
    listen = env["CLASSMESH_LISTEN"]["value"]
    assert ports == {"grpc": int(listen.rsplit(":", 1)[1])}
    # Readiness is the service's own health status (registered per service name).
    assert container["readinessProbe"]["grpc"]["service"] == SERVICES[name]
    assert container["readinessProbe"]["grpc"]["port"] == ports["grpc"]


def test_every_deployment_has_a_service_that_selects_it_on_a_named_port() -> None:
    services = _of_kind("Service")
    for name, dep in _classmesh_deployments().items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        port_names = {p["name"] for p in container["ports"]}
        matching = [s for s in services if s["spec"]["selector"].items() <= labels.items()]
        assert len(matching) == 1, f"{name}: {len(matching)} Services select it"
        for port in matching[0]["spec"]["ports"]:
            assert port["targetPort"] in port_names, (name, port)
    gateway = next(s for s in services if s["metadata"]["name"] == "classmesh-gateway")
    assert [p["port"] for p in gateway["spec"]["ports"]] == [8080]


def test_secrets_referenced_exist_and_turn_is_shared_with_coturn() -> None:
    secrets = {s["metadata"]["name"]: s for s in _of_kind("Secret")}
    for dep in _of_kind("Deployment"):
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        for ref in container.get("envFrom", []):
            assert ref["secretRef"]["name"] in secrets, ref
        for var in container.get("env", []):
            key_ref = var.get("valueFrom", {}).get("secretKeyRef")
            if key_ref:
                assert key_ref["key"] in secrets[key_ref["name"]]["stringData"], key_ref
    turn = secrets["classmesh-turn"]["stringData"]
    urls = [u.strip() for u in turn["CLASSMESH_TURN_URLS"].split(",")]
    assert {u.split(":", 1)[0] for u in urls} == {"stun", "turn", "turns"}
    # SessionService (join response) and MediaService (GetTurnCredentials) mint with it.
    deployments = _classmesh_deployments()
    for name in ("session", "media"):
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        assert "classmesh-turn" in [s["secretRef"]["name"] for s in container["envFrom"]]
    # coturn verifies with the same secret, and the config file asks for REST credentials.
    coturn = next(d for d in _of_kind("Deployment") if d["metadata"]["name"] == "classmesh-turn")
    (container,) = coturn["spec"]["template"]["spec"]["containers"]
    assert "--static-auth-secret=$(CLASSMESH_TURN_SECRET)" in container["args"]
    conf = (K8S / "turnserver.conf").read_text().splitlines()
    assert "use-auth-secret" in conf
    assert not any(line.startswith("static-auth-secret") for line in conf)


def test_media_notes_its_processes_and_udp_ports() -> None:
    media = _classmesh_deployments()["media"]
    text = (K8S / "media.yaml").read_text()
    assert "UDP" in text and "worker processes" in text
    spec = media["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["CLASSMESH_MEDIA_ICE_HOSTS"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    # One core per worker plus the signaling process.
    workers = int(env["CLASSMESH_MEDIA_WORKERS"]["value"])
    assert workers >= 1
    assert int(container["resources"]["requests"]["cpu"]) == workers + 1
    # Routers live in one process: one replica until placement across pods exists.
    assert media["spec"]["replicas"] == 1
    # SessionService reaches MediaService through its Service.
    session = _classmesh_deployments()["session"]
    (sc,) = session["spec"]["template"]["spec"]["containers"]
    peer = {e["name"]: e.get("value") for e in sc["env"]}["CLASSMESH_PEER_TARGET"]
    assert peer == "classmesh-media:50051"


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = _docs()["kustomization.yaml"]
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert len(listed) == len(set(listed))
    generated = [f for g in kustomization.get("configMapGenerator", []) for f in g["files"]]
    for name in generated:
        assert (K8S / name).is_file(), name
