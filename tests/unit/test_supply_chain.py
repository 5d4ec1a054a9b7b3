"""The lock files match pyproject.toml, and the environment holds no unexpected .pth file.

requirements/supply_chain.py does the checking (it runs before anything is installed, so it is
a script, not part of the package); these tests run it on the real tree and on altered copies.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    path = ROOT / "requirements" / "supply_chain.py"
    spec = importlib.util.spec_from_file_location("supply_chain", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


sc = _load()


@pytest.fixture
def locks(tmp_path: Path) -> Path:
    """A copy of requirements/ to spoil."""
    for lock in sc.LOCKS:
        shutil.copy(lock.path, tmp_path / lock.name)
    return tmp_path


def test_the_locks_are_fresh() -> None:
    found = sc.problems()
    assert not found, "\n".join(found)


def test_a_changed_pin_in_pyproject_makes_the_locks_stale() -> None:
    pyproject = copy.deepcopy(sc._pyproject())
    deps = pyproject["project"]["dependencies"]
    i = next(i for i, d in enumerate(deps) if d.startswith("msgspec=="))
    deps[i] = "msgspec==0.21.0"
    found = sc.problems(pyproject=pyproject)
    assert all(line.endswith("run `make lock`") for line in found)
    stale = ", ".join(f"requirements/{lock.name}" for lock in sc.LOCKS)
    assert found[0].startswith(f"{stale} are stale (")
    for name in ("test.txt", "run.txt", "docker.txt"):  # the ones that hold the base dependencies
        line = f"requirements/{name} has msgspec==0.22.0, but 0.21.0 is asked for: run `make lock`"
        assert line in found


def test_a_new_dependency_or_an_unpinned_one_is_caught() -> None:
    pyproject = copy.deepcopy(sc._pyproject())
    pyproject["project"]["optional-dependencies"]["test"].append("leftpad==1.0")
    pyproject["project"]["dependencies"].append("idna>=3")
    found = sc.problems(pyproject=pyproject)
    assert "requirements/test.txt lacks leftpad==1.0: run `make lock`" in found
    assert found.count("'idna>=3' is not pinned with ==: pin it, then run `make lock`") == 1


def test_a_changed_build_tool_makes_the_locks_stale() -> None:
    build_in = [re.sub(r"^uv==.*", "uv==0.0.1", line) for line in sc._build_in()]
    found = sc.problems(build_in=build_in)
    assert "requirements/build.txt has uv==0.13.8, but 0.0.1 is asked for: run `make lock`" in found


def test_comments_and_formatting_do_not_count() -> None:
    pyproject = sc._pyproject()
    assert sc.inputs_digest(pyproject, sc._build_in()) == sc.inputs_digest(
        copy.deepcopy(pyproject), list(sc._build_in())
    )


def test_a_hand_edited_lock_is_caught(locks: Path) -> None:
    run = locks / "run.txt"
    text = run.read_text()
    assert "\nnumpy==2.4.6 \\\n" in text
    run.write_text(text.replace("\nnumpy==2.4.6 \\\n", "\nnumpy==2.4.5 \\\n"))
    found = sc.problems(directory=locks)
    line = "requirements/run.txt has numpy==2.4.5, requirements/test.txt has 2.4.6: run `make lock`"
    assert line in found


def test_a_lock_entry_without_a_hash_is_caught(locks: Path) -> None:
    docker = locks / "docker.txt"
    text = re.sub(r"(\npyyaml==6\.0\.3) \\\n(?:    --hash=\S+(?: \\)?\n)+", r"\1\n", docker.read_text())
    docker.write_text(text)
    found = sc.problems(directory=locks)
    assert "requirements/docker.txt: pyyaml==6.0.3 has no --hash: run `make lock`" in found


def test_a_missing_lock_is_caught(locks: Path) -> None:
    (locks / "build.txt").unlink()
    assert "requirements/build.txt is missing: run `make lock`" in sc.problems(directory=locks)


def test_every_lock_records_the_inputs_of_pyproject() -> None:
    digest = sc.inputs_digest(sc._pyproject(), sc._build_in())
    for lock in sc.LOCKS:
        assert lock.path.read_text().startswith(f"{sc.HEADER}{digest} ")


def test_this_environment_has_no_unexpected_pth_file() -> None:
    found = sc.unexpected_pth(sc.site_packages())
    assert not found, "\n".join(found)


def test_an_unexpected_pth_file_is_caught(tmp_path: Path) -> None:
    (tmp_path / "distutils-precedence.pth").write_text("import os; ...\n")
    (tmp_path / "_editable_impl_llmrouter.pth").write_text("/work/src\n")
    (tmp_path / "litellm_init.pth").write_text("import base64; exec(base64.b64decode('...'))\n")
    assert sc.unexpected_pth([tmp_path]) == [
        f"{tmp_path / 'litellm_init.pth'}: unexpected .pth file (runs at every Python start)"
    ]


def test_the_editable_pth_may_not_run_code(tmp_path: Path) -> None:
    (tmp_path / "_editable_impl_llmrouter.pth").write_text("/work/src\nimport evil\n")
    assert sc.unexpected_pth([tmp_path]) == [
        f"{tmp_path / '_editable_impl_llmrouter.pth'}: an editable install's .pth file that runs code"
    ]


def test_the_installs_use_the_locks_with_hashes() -> None:
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "--require-hashes" in makefile and "-r requirements/test.txt" in makefile
    assert "-r requirements/run.txt" in makefile and "-r requirements/build.txt" in makefile
    assert "--require-hashes" in dockerfile and "-r requirements/docker.txt" in dockerfile
    # Anything else pip installs goes without dependencies: only the locks bring packages.
    for text in (makefile, dockerfile):
        for command in re.findall(r"pip install[^\n]*(?:\\\n[^\n]*)*", text):
            assert "--require-hashes" in command or "--no-deps" in command, command


def test_images_are_pinned_by_digest() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    compose = (ROOT / "deploy" / "compose.yaml").read_text()
    images = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    images += re.findall(r"^\s*image: (\S+)", compose, re.M)
    assert images
    unpinned = [image for image in images if not re.search(r"@sha256:[0-9a-f]{64}$", image)]
    assert unpinned == []
