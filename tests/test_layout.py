"""The checkout is safe to import from, and the install ships every subpackage it has.

The repository root is on ``sys.path`` under ``python -m pytest`` and in a notebook started there,
so a package at the root shadows any installed distribution of the same name: a top-level
``kernels/`` once broke every model load once transformers (5.25) began importing PyPI's ``kernels``.
"""

import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_only_importable_name_at_the_root_is_dami_jax():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert packages | modules == {"dami_jax"}


def test_pyproject_lists_every_subpackage_on_disk():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "dami_jax").rglob("__init__.py")
    }
    assert listed == on_disk
