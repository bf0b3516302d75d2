"""``dami-jax`` command line: thin wrappers over the library, one module per group of commands
(generate; dami: sweep, diagnose, train-router, route-eval; tailorkv: profile-layers, niah;
serve), the shared conventions in ``common`` and the entry point in ``main``."""

from dami_jax.cli.common import CACHES, MIXES, NIAH_CONFIGS, NIAH_DEPTHS, PAIRS, ROUTERS, STYLES, TEMPLATES, TOKEN_SCORES, TRACES  # noqa: F401
from dami_jax.cli.main import build_parser, console, main  # noqa: F401
