"""The install files agree and the GPU install resolves: offline, no download (the published requirements of the
gpu extra's pinned packages are kept in env/gpu_requires_dist.txt)."""
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parent.parent
LINUX_PY311 = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
               "python_version": "3.11", "python_full_version": "3.11.7", "os_name": "posix", "extra": ""}


def requirement_lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines()
            if line.split("#")[0].strip() and not line.startswith("[")]


def as_set(lines) -> set[str]:
    return {str(Requirement(line)) for line in lines}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_env_files_say_what_pyproject_says():
    assert as_set(requirement_lines(ROOT / "env" / "minimal_requirements.txt")) == as_set(project()["dependencies"])
    gpu = as_set(requirement_lines(ROOT / "env" / "requirements-gpu.txt"))
    assert gpu == as_set(project()["optional-dependencies"]["gpu"])
    recorded = {line[1:-1] for line in (ROOT / "env" / "gpu_requires_dist.txt").read_text().splitlines()
                if line.startswith("[")}
    assert {str(Requirement(r)).lower().replace("_", "-") for r in recorded} == {
        str(Requirement(r)).lower().replace("_", "-") for r in gpu}  # remade when a GPU pin changes


def gpu_install_conflicts(requirements: list[Requirement], witnesses: dict[str, set[Version]]) -> list[str]:
    """Names whose constraints (markers evaluated for Linux x86_64, Python 3.11) no candidate version meets.
    Candidates: the exact pins, the versions the constraints name, and ``witnesses`` (e.g. the installed ones)."""
    by_name: dict[str, list[Requirement]] = {}
    for req in requirements:
        if req.marker is None or req.marker.evaluate(LINUX_PY311):
            by_name.setdefault(canonicalize_name(req.name), []).append(req)
    conflicts = []
    for name, reqs in by_name.items():
        candidates = set(witnesses.get(name, set()))
        candidates |= {Version(spec.version.rstrip(".*")) for req in reqs for spec in req.specifier}
        if not any(all(req.specifier.contains(v, prereleases=True) for req in reqs) for v in candidates) and any(
                req.specifier for req in reqs):
            conflicts.append(f"{name}: {' / '.join(str(req.specifier) for req in reqs)}")
    return conflicts


def gpu_requirements() -> list[Requirement]:
    recorded = requirement_lines(ROOT / "env" / "gpu_requires_dist.txt")
    return [Requirement(r) for r in [*project()["dependencies"], *project()["optional-dependencies"]["gpu"],
                                     *recorded]]


def installed_versions() -> dict[str, set[Version]]:
    from importlib import metadata

    found = {}
    for dist in metadata.distributions():
        try:
            found.setdefault(canonicalize_name(dist.metadata["Name"]), set()).add(Version(dist.version))
        except Exception:  # a distribution without a name or with a version packaging cannot read
            continue
    return found


def test_the_gpu_install_resolves():
    """pip install -e ".[gpu]" on a GPU node: flare-exp's pins, the gpu extra's and what those packages require
    admit one version of every package (the resolver would otherwise refuse, as trl 1.16.0 against Unsloth's
    trl<=1.15.0 did)."""
    assert gpu_install_conflicts(gpu_requirements(), installed_versions()) == []


def test_a_conflicting_pin_is_found():
    conflicts = gpu_install_conflicts([*gpu_requirements(), Requirement("trl==1.16.0")], installed_versions())
    assert conflicts and conflicts[0].startswith("trl:")
    assert gpu_install_conflicts([Requirement("transformers==5.23.0"), Requirement("transformers<=5.17.0")], {})


def _pypi_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_pip_resolves_the_gpu_install_online(tmp_path):
    """pip's own resolver on the one GPU install command, `pip install -e ".[gpu]"` (a dry run: only metadata is
    fetched, ~150 packages, about 90 s). Opt-in (FLARE_EXP_PIP_ONLINE=1) because of that time and the network;
    the offline checks above run always."""
    import json
    import os
    import subprocess
    import sys

    if os.environ.get("FLARE_EXP_PIP_ONLINE") != "1":
        pytest.skip("pip's online resolver run is opt-in: FLARE_EXP_PIP_ONLINE=1 (about 90 s, needs pypi.org)")
    if not _pypi_reachable():
        pytest.skip("pypi.org is not reachable (offline): the pins' consistency is checked offline above")
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), "-e", f"{ROOT}[gpu]"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
              for i in json.loads(report.read_text())["install"]}
    pins = {canonicalize_name(Requirement(r).name): str(Requirement(r).specifier)[2:]
            for r in project()["optional-dependencies"]["gpu"]}
    assert {name: chosen.get(name) for name in pins} == pins
