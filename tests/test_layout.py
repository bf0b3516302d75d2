"""The checkout is safe to import from, and the install ships every package it has.

The repository root is on ``sys.path`` under ``python -m pytest`` and in a notebook started there,
so a package at the root shadows any installed distribution of the same name: a top-level
``kernels/`` package once broke every model load once transformers (5.25) began importing PyPI's
``kernels``. The kernels now live in ``kernels/dami_kernels/`` (import name ``dami_kernels``,
mapped by ``package-dir``) under a ``kernels/`` folder without ``__init__.py``, which loses to
PyPI's regular package wherever that sits on ``sys.path``. Checked here as users meet it: the
editable install (``make test``) and a built wheel, each from the root and from elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels" / "dami_kernels"
KERNEL_MODULES = sorted(p.stem for p in KERNELS.glob("*.py") if p.stem != "__init__")
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]

# Imports both names, then every kernel module (so the package works, not only its folder).
PROBE = """
import importlib, json, pkgutil
import kernels, dami_kernels
modules = sorted(m.name for m in pkgutil.iter_modules(dami_kernels.__path__))
for name in modules:
    importlib.import_module(f"dami_kernels.{name}")
print(json.dumps({"kernels": kernels.__file__, "dami_kernels": dami_kernels.__file__, "modules": modules}))
"""


def probe(cwd: Path, *flags: str, pythonpath: str | None = None) -> dict:
    """Run PROBE with ``python -c`` in ``cwd`` (``-c`` puts ``cwd`` first on sys.path)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    command = [sys.executable, *flags, "-c", PROBE]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_pypi_kernels(found: dict, dami_kernels_init: Path) -> None:
    """``kernels`` is the distribution ``kernels`` from PyPI (our folder, a namespace portion, would
    have no __file__), ``dami_kernels`` comes from ``dami_kernels_init`` and holds every module on disk."""
    assert Path(found["kernels"]) == Path(metadata.distribution("kernels").locate_file("kernels/__init__.py")), found
    assert Path(found["dami_kernels"]) == dami_kernels_init
    assert found["modules"] == KERNEL_MODULES


def test_the_root_holds_no_package_but_dami_jax():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert packages | modules == {"dami_jax"}
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_pyproject_lists_every_package_on_disk():
    assert SETUPTOOLS["package-dir"] == {"dami_kernels": "kernels/dami_kernels"}
    on_disk = set()
    for name, folder in [("dami_jax", ROOT / "dami_jax"), ("dami_kernels", KERNELS)]:
        on_disk |= {".".join((name, *init.parent.relative_to(folder).parts)) for init in folder.rglob("__init__.py")}
    assert set(SETUPTOOLS["packages"]) == on_disk


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_editable_install_imports_dami_kernels_and_leaves_kernels_to_pypi(where, tmp_path):
    found = probe(ROOT if where == "root" else tmp_path)
    assert_pypi_kernels(found, KERNELS / "__init__.py")


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, a folder it is installed into), built from a copy of the package's sources
    (building in the checkout would leave build/ and egg-info there)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("dami_jax", "kernels"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    build = ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", str(tmp / "dist"), str(source)]
    subprocess.run([*pip, *build], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("dami_jax-*.whl")
    site = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--no-compile", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    return wheel, site


def test_the_wheel_ships_dami_kernels_and_no_kernels_package(wheel_site):
    wheel, _ = wheel_site
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("kernels/")]
    shipped = [n.removeprefix("dami_kernels/").removesuffix(".py") for n in names if n.startswith("dami_kernels/")]
    assert sorted(shipped) == sorted(["__init__", *KERNEL_MODULES])


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_an_installed_wheel_imports_dami_kernels_and_leaves_kernels_to_pypi(where, wheel_site, tmp_path):
    """``python -S``: no site-packages .pth runs, so the editable install's finder is out; the
    wheel's folder comes first, then this environment's packages (jax, PyPI's kernels)."""
    _, site = wheel_site
    path = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])
    found = probe(ROOT if where == "root" else tmp_path, "-S", pythonpath=path)
    assert_pypi_kernels(found, site / "dami_kernels" / "__init__.py")
