"""docker/Dockerfile, read as Docker reads it (Docker cannot run here): the official Ray image of
pyproject.toml's Ray pin, raybooth from its wheel with pyproject's pins, a non-root user, no
`latest`, no build tools or test dependencies in the final stage, HF_HOME on a volume."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pin(name: str) -> Requirement:
    for dep in _pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            return req
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def _args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            out[name] = value.strip('"')
    return out


def test_every_base_is_the_official_ray_image_of_the_pinned_ray():
    ray_pin = _pin("ray")
    (spec,) = ray_pin.specifier
    assert spec.operator == "==", "the cluster image needs an exact Ray pin"
    instructions = _instructions(DOCKERFILE.read_text())
    flavor = _args(instructions)["FLAVOR"]
    assert flavor in ("cpu", "gpu")
    froms = [rest.split()[0] for word, rest in instructions if word == "FROM"]
    assert len(froms) == 2
    requires_python = SpecifierSet(_pyproject()["project"]["requires-python"])
    for image in froms:
        match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-\$\{FLAVOR\}", image)
        assert match, f"{image}: not rayproject/ray:<pinned version>-py3NN-${{FLAVOR}}"
        assert match.group(1) == spec.version
        assert f"3.{match.group(2)}" in requires_python
        assert "latest" not in image
    # Any image tag anywhere (also in comments and docs of the file) is never `latest`.
    assert ":latest" not in DOCKERFILE.read_text()
    # The wheel's install step asserts the same version inside the image.
    assert f"ray.__version__ == '{spec.version}'" in DOCKERFILE.read_text()


def test_raybooth_is_installed_from_its_wheel_with_pyprojects_pins_and_no_dev_extras():
    instructions = _instructions(DOCKERFILE.read_text())
    build, final = _stages(instructions)
    assert any(w == "RUN" and "pip wheel --no-deps" in r for w, r in build)
    runs = " ".join(r for w, r in final if w == "RUN")
    assert "raybooth-*.whl" in runs and "--mount=type=bind,from=build" in runs  # the wheel is no layer
    # Nothing else names a requirement: the wheel's own metadata (pyproject's) decides, except
    # torch's build, whose version must lie in pyproject's range.
    torch_version = _args(instructions)["TORCH_VERSION"]
    assert torch_version in _pin("torch").specifier
    for banned in ("[dev]", "pytest", "-e ", "requirements", "build-essential", "gcc", "apt-get install"):
        assert banned not in runs, banned
    assert not any(w == "COPY" and ("tests" in r.split() or "src" in r.split()) for w, r in final)


def test_runs_as_a_non_root_user_with_hf_home_on_a_volume():
    instructions = _instructions(DOCKERFILE.read_text())
    final = _stages(instructions)[-1]
    users = [r for w, r in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # Numeric: Kubernetes' runAsNonRoot can only verify a numeric user.
    assert users[-1].split(":")[0].isdigit()
    env = " ".join(r for w, r in final if w == "ENV")
    hf_home = re.search(r"HF_HOME=(\S+)", env).group(1)
    volumes = " ".join(r for w, r in final if w == "VOLUME")
    assert f'"{hf_home}"' in volumes or hf_home in volumes.split()


def test_the_build_context_holds_only_what_the_image_copies():
    lines = (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # everything is left out unless named
    copied = set()
    for word, rest in _instructions(DOCKERFILE.read_text()):
        if word == "COPY" and "--from" not in rest:
            sources = [p for p in rest.split() if not p.startswith("--")][:-1]
            copied.update(s.rstrip("/") for s in sources)
    allowed = {line.lstrip("!").rstrip("/") for line in ignore if line.startswith("!")}
    assert copied <= allowed, copied - allowed
    for path in copied:
        assert (REPO / path).exists(), path
