"""The cluster's Ray and raybooth against this client's.

A job runs the cluster's installed raybooth (from the image), and a config written for one
raybooth may mean something else to another; Ray's own job protocol is only promised between equal
versions. So both must be equal, and `raybooth submit` refuses a cluster that differs before the
job is submitted. The cluster's versions are read by a probe job: a few lines of Python run by the
cluster's own interpreter, the one every job's driver uses.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass

from raybooth.platform.errors import UserError

# The probe prints one line that starts with this marker; everything else in its log is ignored.
PROBE_MARKER = "RAYBOOTH_VERSIONS "
PROBE_CODE = (
    "import json, platform\n"
    "try:\n"
    "    import ray; ray_version = ray.__version__\n"
    "except Exception:\n"
    "    ray_version = None\n"
    "try:\n"
    "    import raybooth; raybooth_version = raybooth.__version__\n"
    "except Exception:\n"
    "    raybooth_version = None\n"
    f"print({PROBE_MARKER!r} + json.dumps({{'ray': ray_version, 'raybooth': raybooth_version, "
    "'python': platform.python_version()}), flush=True)\n"
)


@dataclass(frozen=True)
class Versions:
    """What one side runs. `None`: not installed there."""

    ray: str | None
    raybooth: str | None
    python: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Versions":
        data = json.loads(text)
        return cls(ray=data.get("ray"), raybooth=data.get("raybooth"), python=data.get("python"))

    def describe(self) -> str:
        return (f"Ray {self.ray or 'not installed'}, raybooth {self.raybooth or 'not installed'}"
                f"{f', Python {self.python}' if self.python else ''}")


def local_versions() -> Versions:
    import ray

    from raybooth import __version__

    return Versions(ray=ray.__version__, raybooth=__version__, python=platform.python_version())


def probe_entrypoint() -> str:
    """The probe job's shell command: the cluster's `python`, the interpreter that runs jobs."""
    import shlex

    return f"python -c {shlex.quote(PROBE_CODE)}"


def parse_probe_output(logs: str) -> Versions | None:
    for line in reversed(logs.splitlines()):
        if line.startswith(PROBE_MARKER):
            return Versions.from_json(line[len(PROBE_MARKER):])
    return None


class VersionMismatch(UserError):
    """The cluster runs another Ray or raybooth than this client."""


def check_match(client: Versions, cluster: Versions, address: str) -> None:
    """Raise VersionMismatch naming both sides and what to do, unless Ray and raybooth are equal."""
    differ = [name for name in ("ray", "raybooth") if getattr(client, name) != getattr(cluster, name)]
    if not differ:
        return
    if cluster.raybooth is None:
        hint = ("raybooth is not installed on the cluster: run the cluster on the raybooth image "
                "(docker/Dockerfile), which has raybooth and its pinned dependencies")
    else:
        hint = (f"run a cluster built from this raybooth (docker/Dockerfile, raybooth "
                f"{client.raybooth} with Ray {client.ray}), or install raybooth {cluster.raybooth} "
                f"with Ray {cluster.ray} here")
    raise VersionMismatch(
        f"the cluster at {address} runs {cluster.describe()}; this client runs {client.describe()}. "
        f"{' and '.join(n.replace('ray', 'Ray', 1) if n == 'ray' else n for n in differ)} must be "
        f"the same on both sides, so nothing was submitted: {hint}",
        field="version",
    )
