"""Builds and runs the Dockerfile with podman on a machine that reaches no registry of base images.

`python -m tools.image build` (what `make image` runs):

1. The base: Debian bookworm with its own Python 3.11 and venv, made by mmdebstrap from Debian's
   packages and imported as `localhost/askmesh-base:bookworm` (once; kept while it exists). The
   Dockerfile's default base, python:3.11.7-slim-bookworm, is the same Debian release with
   python.org's build of 3.11.7 in /usr/local; Debian's is 3.11.2 in /usr.
2. The image, with that base (`--build-arg PYTHON_IMAGE=...`). The CPU torch wheel and the
   llama-cpp-python wheel that `make install` built are mounted into the build (`--volume`) and
   offered to pip by PIP_FIND_LINKS, so the build needs neither download.pytorch.org (not
   reachable here) nor the ~9-minute compile; everything else comes from PyPI. The host's CA
   bundle is mounted too (PIP_CERT), as pip on the host uses it. A plain `docker build .`
   passes none of these and is unchanged by them.

Some of podman's defaults fail on this kind of machine, each for a reason given where it is
worked around (`podman_command`, `ulimit_options`). Layers are cached in podman's own storage
(/var/lib/containers) between builds, so a rebuild after a code change redoes only the last ones.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "localhost/askmesh-base:bookworm"
IMAGE = "localhost/askmesh:dev"
DEBIAN_SUITE = "bookworm"
DEBIAN_SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# What the Dockerfile's stages need of their base: python3 with venv (and pip through ensurepip),
# CA certificates for PyPI; groupadd/useradd and apt come with every Debian.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
TORCH_WHEEL_GLOB = "torch-2.13.0+cpu-cp311-cp311-*.whl"
LLAMA_WHEEL_GLOB = "llama_cpp_python-0.3.36-*.whl"
# podman run as root lowers its own RLIMIT_NPROC to this (seen in /proc/<podman>/limits), so a
# container can be given no more.
PODMAN_NPROC = 32768
TOOLS = ("podman", "runc", "mmdebstrap")


class ImageError(RuntimeError):
    """A step of the build failed; the message says which and why, in one sentence."""


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def podman_command(*args: str) -> list[str]:
    """podman with the settings this machine needs, before `args` (a subcommand and its options).

    - `--runtime runc`: Debian's crun 1.8 refuses to start any container on a host with cgroup v1
      and v2 mounted together ("crun: cgroups in hybrid mode not supported, drop all controllers
      from cgroupv2"), even with --cgroups=disabled; runc starts them.
    """
    return ["podman", "--runtime", "runc", *args]


def ulimit_options() -> list[str]:
    """Explicit limits for `podman run` and `podman build`: by default podman asks the runtime for
    RLIMIT_NOFILE 1048576, above this machine's hard limit, and without CAP_SYS_RESOURCE raising a
    limit fails ("error setting rlimit type 7: operation not permitted"; 6, NPROC, likewise)."""
    _, nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    _, nproc_hard = resource.getrlimit(resource.RLIMIT_NPROC)
    nofile = min(nofile_hard, 1048576) if nofile_hard != resource.RLIM_INFINITY else 1048576
    nproc = min(nproc_hard, PODMAN_NPROC) if nproc_hard != resource.RLIM_INFINITY else PODMAN_NPROC
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def _pip_config(key: str) -> list[str]:
    """A pip setting as the host's pip sees it (environment first, then its config files)."""
    value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
    if value is None:
        found = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", f"global.{key}"], capture_output=True, text=True
        )
        value = found.stdout.strip() if found.returncode == 0 else ""
    return value.split()


def find_torch_wheel() -> Path | None:
    """The CPU torch wheel in pip's find-links folders (where `pip install torch==2.13.0` takes
    it from on this machine)."""
    for folder in _pip_config("find-links"):
        path = Path(folder.removeprefix("file://"))
        if path.is_dir():
            for wheel in sorted(path.glob(TORCH_WHEEL_GLOB)):
                return wheel
    return None


def find_llama_wheel() -> Path | None:
    """The llama-cpp-python wheel pip built and cached when `make install` compiled it."""
    found = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "list", "llama_cpp_python", "--format=abspath"],
        capture_output=True,
        text=True,
    )
    wheels = [Path(line) for line in found.stdout.split() if Path(line).match(LLAMA_WHEEL_GLOB)]
    return max(wheels, key=lambda p: p.stat().st_mtime) if wheels else None


def find_ca_bundle() -> Path | None:
    """The CA bundle pip uses here (this machine reaches PyPI through a proxy whose CA only the
    host's bundle has), else the system's."""
    for candidate in (*_pip_config("cert"), ssl.get_default_verify_paths().openssl_cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@dataclass(frozen=True)
class BuildInputs:
    torch_wheel: Path
    llama_wheel: Path | None  # None: llama-cpp-python compiles in the build (~9 minutes here)
    ca_bundle: Path | None

    @classmethod
    def find(cls) -> BuildInputs:
        torch_wheel = find_torch_wheel()
        if torch_wheel is None:
            raise ImageError(
                f"no {TORCH_WHEEL_GLOB} in pip's find-links folders, and download.pytorch.org cannot be reached"
            )
        return cls(torch_wheel, find_llama_wheel(), find_ca_bundle())


def image_exists(name: str) -> bool:
    return subprocess.run(podman_command("image", "exists", name)).returncode == 0


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command)
    if result.returncode != 0:
        raise ImageError(f"{what} failed with exit code {result.returncode}: {' '.join(command)}")


def build_base(name: str = BASE_IMAGE) -> None:
    """Debian bookworm with python3 and venv from Debian's packages, imported as `name`."""
    bootstrap = subprocess.Popen(
        ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
         DEBIAN_SUITE, "-", *DEBIAN_SOURCES],
        stdout=subprocess.PIPE,
    )
    assert bootstrap.stdout is not None
    imported = subprocess.run(
        podman_command("import", "--change", 'CMD ["/bin/bash"]', "-", name), stdin=bootstrap.stdout,
        stdout=subprocess.DEVNULL,
    )
    bootstrap.stdout.close()
    if bootstrap.wait() != 0 or imported.returncode != 0:
        raise ImageError(f"making the base image {name} with mmdebstrap failed (exit {bootstrap.returncode})")


def build_command(
    inputs: BuildInputs, tag: str = IMAGE, base: str = BASE_IMAGE, models: str = "baked"
) -> list[str]:
    wheels = [w for w in (inputs.torch_wheel, inputs.llama_wheel) if w is not None]
    mounts = [f"--volume={w}:/wheels/{w.name}:ro" for w in wheels]
    args = [
        f"--build-arg=PYTHON_IMAGE={base}",
        f"--build-arg=MODELS={models}",
        # PyPI: pip takes torch 2.13.0+cpu from /wheels (a local version sorts above PyPI's
        # 2.13.0) and torch's own dependencies from PyPI.
        "--build-arg=TORCH_INDEX_URL=https://pypi.org/simple",
        "--build-arg=PIP_FIND_LINKS=/wheels",
    ]
    if inputs.ca_bundle is not None:
        mounts.append(f"--volume={inputs.ca_bundle}:/run/askmesh-build/ca.crt:ro")
        args.append("--build-arg=PIP_CERT=/run/askmesh-build/ca.crt")
    return podman_command("build", *ulimit_options(), "--layers", *mounts, *args, "--tag", tag, str(ROOT))


def build(tag: str = IMAGE, models: str = "baked", say: Callable[[str], None] = print) -> float:
    """Builds the base if missing, then the image; returns the seconds the image's build took."""
    if missing := missing_tools():
        raise ImageError(f"{', '.join(missing)} not installed (apt-get install podman buildah runc mmdebstrap)")
    inputs = BuildInputs.find()
    if not image_exists(BASE_IMAGE):
        started = time.monotonic()
        build_base()
        say(f"base image {BASE_IMAGE} made in {time.monotonic() - started:.0f} s")
    if inputs.llama_wheel is None:
        say("no cached llama-cpp-python wheel: it compiles in the build (about 9 minutes)")
    started = time.monotonic()
    _run(build_command(inputs, tag, models=models), f"podman build of {tag}")
    return time.monotonic() - started


# What a replica's container is given of the environment the mesh made for it: the tiers' own
# settings and the OpenMP waits; not the host's PATH, venv or home.
PASSED_ENV = frozenset({"HF_HUB_OFFLINE", "PYTHONUNBUFFERED", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"})
LABEL = "io.askmesh.mesh"


@dataclass(frozen=True)
class ContainerReplicas:
    """A LocalMesh's `replica_command` that runs each replica from the image: `podman run` on the
    host's network (the replica listens where the mesh told it to, Envoy runs on the host), with
    the mesh's data folder mounted at the same path (Milvus Lite's and SQLite's files, owned by
    the image's user 10001), as the image's own user. Every container carries the label
    `io.askmesh.mesh=<mesh>`, by which `remove_all` finds them."""

    image: str
    data_dir: Path
    mesh: str

    def __call__(self, tier: str, env: dict[str, str]) -> list[str]:
        passed = sorted(f"--env={k}={v}" for k, v in env.items() if k.startswith("ASKMESH_") or k in PASSED_ENV)
        return podman_command(
            "run", "--rm", "--network=host", *ulimit_options(), f"--label={LABEL}={self.mesh}",
            f"--volume={self.data_dir}:{self.data_dir}", *passed, self.image, tier,
        )

    def containers(self) -> list[str]:
        listed = subprocess.run(
            podman_command("ps", "--all", "--quiet", f"--filter=label={LABEL}={self.mesh}"),
            capture_output=True, text=True, check=True,
        )
        return listed.stdout.split()

    def remove_all(self) -> None:
        """Removes the mesh's containers still there (a podman client killed rather than
        stopped leaves its container running)."""
        if ids := self.containers():
            subprocess.run(podman_command("rm", "--force", *ids), capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build_parser = sub.add_parser("build", help="make the base if missing, then build the image")
    build_parser.add_argument("--tag", default=IMAGE)
    build_parser.add_argument("--models", choices=("baked", "mounted"), default="baked")
    sub.add_parser("base", help="(re)make the Debian base image")
    options = parser.parse_args()
    try:
        if options.command == "base":
            build_base()
        else:
            seconds = build(options.tag, options.models)
            print(f"{options.tag} built in {seconds:.0f} s; run a tier: "
                  f"{' '.join(podman_command('run', *ulimit_options()))} --rm --network host {options.tag} embedder")
    except ImageError as error:
        sys.exit(f"image: {error}")


if __name__ == "__main__":
    main()
