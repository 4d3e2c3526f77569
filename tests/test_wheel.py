"""The wheel as a new user gets it: built from this checkout, installed into a fresh environment
outside the source tree, run from an empty folder.

Cheap enough for CI: the wheel is built with the project venv's setuptools (no build isolation, no
download) and installed alone (--no-deps); torch, MLflow & co come from the project venv's
site-packages, put on the new environment's path by a .pth file. That folder's own .pth files are
not processed from there, so the editable install of the source tree stays off the path, which the
test checks (autorank.__file__ lies in the new environment, no path entry in the source tree).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _checkout_files() -> list[str]:
    """The files of a clean clone plus new, unignored ones (what CI's fresh clone builds from)."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.fail("the wheel test builds from a git checkout's files (as CI's fresh clone): run it in one")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return [name for name in listed if name and (REPO / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for name in _checkout_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    log = built.stdout + built.stderr
    assert built.returncode == 0, log[-4000:]
    assert "deprecat" not in log.lower(), [line for line in log.splitlines() if "eprecat" in line]
    return next((tmp / "dist").glob("autorank-*.whl"))


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment holding only the wheel (dependencies: see the module docstring)."""
    env = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    site = Path(_run(env, "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    (site / "autorank_test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return env


def _run(env: Path, *argv: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`argv` with the environment's bin first on PATH, no PYTHONPATH, from `cwd` (an empty folder)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    environ["PATH"] = f"{env / 'bin'}{os.pathsep}{environ.get('PATH', '')}"
    done = subprocess.run(argv, cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def test_the_wheel_holds_every_package_and_the_shipped_files(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    code = {path.relative_to(REPO).as_posix() for path in (REPO / "autorank").rglob("*.py")}
    assert code <= names, f"pyproject.toml's package list misses {sorted(code - names)}"
    shipped = {f"autorank/search_spaces/{p.name}" for p in (REPO / "search_spaces").glob("*.yaml")}
    assert shipped | {"autorank/mlflow_server/server.yaml"} <= names
    assert not any(name.startswith(("tests/", "scripts/", "search_spaces/", "mlflow_server/")) for name in names)


def test_the_installed_wheel_runs_outside_the_source_tree(venv, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    probe = _run(venv, "python", "-c",
                 "import sys, autorank; autorank.compress; import autorank.compression as c\n"
                 "print(autorank.__file__); print(c.__file__); print(autorank.load_space('resnet_cifar').name)\n"
                 "print([m for m in sys.modules if 'editable' in m])\n"
                 "print(*sys.path, sep='\\n')", cwd=empty).stdout.splitlines()
    assert Path(probe[0]).is_relative_to(venv) and Path(probe[1]).is_relative_to(venv), probe[:2]
    assert probe[2] == "resnet_cifar"  # a shipped space by name, from the package data
    assert probe[3] == "[]"  # the project venv's editable-install finder is not loaded
    with_autorank = [entry for entry in probe[4:] if (Path(entry or empty) / "autorank").exists()]
    assert len(with_autorank) == 1 and Path(with_autorank[0]).is_relative_to(venv), with_autorank

    spaces = _run(venv, "autorank", "spaces", cwd=empty).stdout
    assert [line.split()[0] for line in spaces.splitlines()[:2]] == ["default", "resnet_cifar"]
    assert str(venv) in spaces  # listed from inside the installed package

    assert "NAME|YAML" in _run(venv, "autorank", "search", "--config", "resnet_cifar", "--help", cwd=empty).stdout

    demo = _run(venv, "autorank", "demo", "--trials", "4", "--no-progress", cwd=empty, timeout=900).stdout
    assert "4 trials (0 failed)" in demo and "Pareto front" in demo
    out = empty / "autorank-demo"
    assert (out / "search.json").is_file() and (out / "pareto.html").is_file()
    assert sorted(p.name for p in empty.iterdir()) == ["autorank-demo"]  # nothing else written where it ran
