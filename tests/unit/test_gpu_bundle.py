"""The GPU host bundle (benchmarks/gpu/wheels.txt) covers exactly what the project needs beyond what
such a host has (host-packages.txt), one pinned version each: a dependency added to pyproject.toml
that the host lacks fails here, not on the GPU host. (CI also runs run.sh --cpu-smoke in a fresh
environment holding only the host's packages and the bundle.)"""

from __future__ import annotations

import importlib.metadata as md
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "benchmarks" / "gpu"
# What the host's own PyTorch brings (its CUDA build, with nvidia-* and triton).
HOST_TORCH = {"torch", "torchvision"}
# The host's interpreter: CPython 3.12 on Linux x86_64.
HOST_MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
    "extra": "",
}


def _names(path: Path) -> dict[str, str | None]:
    """Package name -> pinned version (None where unpinned) from a requirements-style file."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins = [s.version for s in req.specifier if s.operator == "=="]
            out[canonicalize_name(req.name)] = pins[0] if pins else None
    return out


def _needed_beyond(host: set[str]) -> set[str]:
    """Every package the project's dependencies pull in, stopping at what the host has."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [Requirement(r) for r in project]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or name in host:
            continue
        seen.add(name)
        for raw in md.requires(req.name) or []:
            sub = Requirement(raw)
            env = dict(HOST_MARKERS)
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in ["", *req.extras]):
                todo.append(sub)
    return seen


def test_the_bundle_is_what_the_project_needs_beyond_the_host():
    host = set(_names(GPU / "host-packages.txt")) | HOST_TORCH
    wheels = _names(GPU / "wheels.txt")
    needed = _needed_beyond(host)
    assert needed - set(wheels) == set(), "add to benchmarks/gpu/wheels.txt"
    assert set(wheels) - needed == set(), "the bundle carries what nothing needs"


def test_the_bundle_pins_one_version_each_the_one_the_tests_run():
    for name, version in _names(GPU / "wheels.txt").items():
        assert version is not None, f"{name} is not pinned"
        assert md.version(name) == version, f"{name}: bundle {version}, tested with {md.version(name)}"
