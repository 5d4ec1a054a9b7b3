"""The lock files in requirements/ and the checks on what gets installed.

    python requirements/supply_chain.py lock [--upgrade]   # `make lock`: regenerate with uv
    python requirements/supply_chain.py check-lock         # fail when a lock is stale
    python requirements/supply_chain.py check-pth          # fail on an unexpected .pth file

Every install (`make run`, `make test`, deploy/Dockerfile) is `pip install --require-hashes` from
one of these files, so each package, direct or transitive, is the version and the exact file
that was locked:

    build.txt   the venv's tools: pip, the build backends (hatchling for llmrouter,
                scikit-build-core + cmake + ninja for llama-cpp-python's sdist), and uv for `make lock`
    run.txt     `.[local]`                                    (make run)
    test.txt    `.[test]`                                     (make test)
    docker.txt  `.` and hatchling, no local engine            (deploy/Dockerfile)

Its inputs are pyproject.toml's dependency lists (dependencies, optional-dependencies,
build-system.requires) and requirements/build.in. `make lock` writes the sha256 of those inputs
at the top of every lock file; check-lock (run by `make test` and by every install) fails when
it differs, so a dependency edited in pyproject.toml without `make lock` fails CI.

This file uses the standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
PYPROJECT = ROOT / "pyproject.toml"
BUILD_IN = REQUIREMENTS / "build.in"
PROJECT = "llmrouter"

# The one platform the locks are resolved for: CPython 3.11 on x86-64 Linux (CI, the developers'
# machines and python:3.11-slim). Hashes cover every file of each locked version, so other
# Linux architectures install from the same files.
COMPILE_OPTIONS = (
    "--generate-hashes",
    "--python-version=3.11",
    "--python-platform=x86_64-unknown-linux-gnu",
    "--custom-compile-command=make lock",
    "--quiet",
)
HEADER = "# inputs-sha256: "
HINT = "run `make lock`"

# The only .pth files an environment built from these locks may hold, by name. Python runs any
# line of a .pth file that starts with `import` at every interpreter start, which is how a
# compromised package (the LiteLLM one on PyPI) runs its code without being imported.
ALLOWED_PTH = {
    "distutils-precedence.pth": "setuptools: makes `import distutils` find its own copy",
    f"_editable_impl_{PROJECT}.pth": "hatchling's editable install of llmrouter: the path of src/",
}


@dataclass(frozen=True)
class Lock:
    name: str
    extras: tuple[str, ...] = ()
    with_pyproject: bool = True
    with_build_system: bool = False
    with_build_in: bool = False

    @property
    def path(self) -> Path:
        return REQUIREMENTS / self.name


# In the order they are made: each is constrained by those before it, so that a package in two
# of them (they share one venv) has one version.
LOCKS = (
    Lock("build.txt", with_pyproject=False, with_build_system=True, with_build_in=True),
    Lock("test.txt", extras=("test",)),
    Lock("run.txt", extras=("local",)),
    Lock("docker.txt", with_build_system=True),
)


def _pyproject() -> dict[str, object]:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


def _build_in(path: Path = BUILD_IN) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def inputs_digest(pyproject: dict[str, object], build_in: list[str]) -> str:
    """sha256 of what the locks are made from; comments and formatting do not count."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    build_system = pyproject["build-system"]
    assert isinstance(build_system, dict)
    inputs = {
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "build-system": build_system.get("requires", []),
        "build.in": build_in,
        "options": [o for o in COMPILE_OPTIONS if o != "--quiet"],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*(;.*)?$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirement(text: str) -> tuple[str, str, str | None]:
    """(canonical name, extras, the version if pinned with ==, else None)."""
    match = _REQ.match(text)
    if not match:
        raise ValueError(f"cannot read requirement {text!r}")
    name, extras, spec = match.group(1), match.group(2) or "", match.group(3)
    pinned = re.fullmatch(r"==\s*([^\s,;]+)", spec)
    return canonical(name), extras, pinned.group(1) if pinned else None


def read_lock(path: Path) -> tuple[str | None, dict[str, tuple[str, int]]]:
    """The lock's recorded inputs digest and {package: (version, number of hashes)}."""
    digest = None
    packages: dict[str, tuple[str, int]] = {}
    current = None
    for line in path.read_text().splitlines():
        if line.startswith(HEADER):
            digest = line[len(HEADER) :].split()[0]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("--hash="):
            if current is None:
                raise ValueError(f"{path.name}: a hash before any package")
            version, hashes = packages[current]
            packages[current] = (version, hashes + 1)
            continue
        name, _, version = parse_requirement(stripped.removesuffix("\\").strip())
        if version is None:
            raise ValueError(f"{path.name}: {stripped!r} is not pinned with ==")
        current = name
        packages[name] = (version, 0)
    return digest, packages


def direct_requirements(lock: Lock, pyproject: dict[str, object], build_in: list[str]) -> list[str]:
    """The requirements a lock is made from, the project's self-references left out."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    build_system = pyproject["build-system"]
    assert isinstance(build_system, dict)
    optional = project.get("optional-dependencies", {})
    wanted: list[str] = []
    if lock.with_pyproject:
        wanted += project.get("dependencies", [])
        pending, seen = list(lock.extras), set()
        while pending:
            extra = pending.pop()
            if extra in seen:
                continue
            seen.add(extra)
            for req in optional.get(extra, []):
                name, extras, _ = parse_requirement(req)
                if name == PROJECT:
                    pending += [e.strip() for e in extras.strip("[]").split(",") if e.strip()]
                else:
                    wanted.append(req)
    if lock.with_build_system:
        wanted += build_system.get("requires", [])
    if lock.with_build_in:
        wanted += build_in
    return wanted


def problems(
    pyproject: dict[str, object] | None = None,
    build_in: list[str] | None = None,
    locks: Iterable[Lock] = LOCKS,
    directory: Path = REQUIREMENTS,
) -> list[str]:
    """Every way the lock files disagree with their inputs, one line each; empty when fresh."""
    pyproject = _pyproject() if pyproject is None else pyproject
    build_in = _build_in() if build_in is None else build_in
    digest = inputs_digest(pyproject, build_in)
    found: list[str] = []
    stale: list[str] = []
    versions: dict[str, tuple[str, str]] = {}  # package -> (version, the lock that has it)
    for lock in locks:
        path = directory / lock.name
        shown = f"requirements/{lock.name}"
        if not path.exists():
            found.append(f"{shown} is missing: {HINT}")
            continue
        try:
            recorded, packages = read_lock(path)
        except ValueError as e:
            found.append(f"{e}: {HINT}")
            continue
        if recorded != digest:
            stale.append(shown)
        for req in direct_requirements(lock, pyproject, build_in):
            name, _, version = parse_requirement(req)
            if version is None:
                found.append(f"{req!r} is not pinned with ==: pin it, then {HINT}")
            elif name not in packages:
                found.append(f"{shown} lacks {name}=={version}: {HINT}")
            elif packages[name][0] != version:
                found.append(
                    f"{shown} has {name}=={packages[name][0]}, but {version} is asked for: {HINT}"
                )
        for name, (version, hashes) in packages.items():
            if hashes == 0:
                found.append(f"{shown}: {name}=={version} has no --hash: {HINT}")
            if name in versions and versions[name][0] != version:
                other_version, other = versions[name]
                found.append(
                    f"{shown} has {name}=={version}, requirements/{other} has {other_version}: {HINT}"
                )
            versions.setdefault(name, (version, lock.name))
    if stale:
        found.insert(
            0,
            f"{', '.join(stale)} {'is' if len(stale) == 1 else 'are'} stale (pyproject.toml's "
            f"dependencies or requirements/build.in changed since made): {HINT}",
        )
    return list(dict.fromkeys(found))  # a pin shared by several locks is reported once


def site_packages() -> list[Path]:
    """The running environment's site-packages directories."""
    paths = sysconfig.get_paths()
    return sorted({Path(paths[key]).resolve() for key in ("purelib", "platlib")})


def unexpected_pth(directories: Iterable[Path]) -> list[str]:
    """Every .pth file not in ALLOWED_PTH, and an allowed editable one that runs code."""
    found = []
    for directory in directories:
        for path in sorted(directory.glob("*.pth")):
            if path.name not in ALLOWED_PTH:
                found.append(f"{path}: unexpected .pth file (runs at every Python start)")
            elif path.name.startswith("_editable_impl_") and any(
                line.lstrip().startswith("import") for line in path.read_text().splitlines()
            ):
                found.append(f"{path}: an editable install's .pth file that runs code")
    return found


def lock(uv: str, upgrade: bool) -> None:
    """Regenerate every lock file with uv, keeping the versions already locked unless upgrading."""
    pyproject = _pyproject()
    build_in = _build_in()
    digest = inputs_digest(pyproject, build_in)
    build_system = pyproject["build-system"]
    assert isinstance(build_system, dict)
    with tempfile.TemporaryDirectory() as tmp:
        build_requires = Path(tmp) / "build-system.in"
        build_requires.write_text("".join(f"{r}\n" for r in build_system["requires"]))
        for i, spec in enumerate(LOCKS):
            sources = []
            if spec.with_pyproject:
                sources += [str(PYPROJECT.relative_to(ROOT))]
            if spec.with_build_system:
                sources += [str(build_requires)]
            if spec.with_build_in:
                sources += [str(BUILD_IN.relative_to(ROOT))]
            command = [uv, "pip", "compile", *sources, *COMPILE_OPTIONS]
            command += [f"--extra={extra}" for extra in spec.extras]
            for earlier in LOCKS[:i]:
                command += ["--constraints", f"requirements/{earlier.name}"]
            command += ["--upgrade"] if upgrade else []
            command += ["--output-file", str(spec.path.relative_to(ROOT))]
            subprocess.run(command, cwd=ROOT, check=True)
            text = spec.path.read_text().replace(str(build_requires), "pyproject.toml's build-system")
            lines = [line for line in text.splitlines(keepends=True) if not line.startswith(HEADER)]
            head = f"{HEADER}{digest} (of pyproject.toml's dependency lists and build.in)\n"
            spec.path.write_text(head + "".join(lines))
            print(f"requirements/{spec.name}: {sum(1 for _ in read_lock(spec.path)[1])} packages")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("lock", help="regenerate the lock files")
    make.add_argument("--uv", default="uv", help="the uv executable")
    make.add_argument("--upgrade", action="store_true", help="move every package to its newest")
    commands.add_parser("check-lock", help="fail when a lock file is stale")
    commands.add_parser("check-pth", help="fail on an unexpected .pth file in site-packages")
    args = parser.parse_args(argv)
    if args.command == "lock":
        lock(args.uv, args.upgrade)
        return 0
    found = problems() if args.command == "check-lock" else unexpected_pth(site_packages())
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
