"""``python -m dami_jax.cli``: the ``dami-jax`` script."""

from dami_jax.cli.main import console

console()
