"""DAMI parameter interpolation: theta(lam) = theta_I + lam * (theta_T - theta_I).

One jitted tree map over all parameters (embeddings, norms and head included), computed in
float32 and cast back to the storage dtype. ``lam`` is traced, so sweeping it never
recompiles; sharded inputs give identically sharded outputs (element-wise ops keep layouts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dami_jax.errors import InputError
from dami_jax.models.params import Params, path_str


def check_compatible(
    a: Params, b: Params, names: tuple[str, str] = ("theta_instruct", "theta_thinking"), same_dtype: bool = True
) -> None:
    """Raise :class:`InputError` naming the first parameter path where the trees differ in
    structure, shape or (with ``same_dtype``) dtype."""
    flat_a = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(a)[0]}
    flat_b = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(b)[0]}
    for path, x in flat_a.items():
        if path not in flat_b:
            raise InputError(f"parameter {path} exists only in {names[0]}: the two trees differ in structure")
        y = flat_b[path]
        if x.shape != y.shape:
            raise InputError(f"parameter {path}: shape {x.shape} in {names[0]} vs {y.shape} in {names[1]}")
        if same_dtype and x.dtype != y.dtype:
            raise InputError(f"parameter {path}: dtype {x.dtype} in {names[0]} vs {y.dtype} in {names[1]}")
    extra = [p for p in flat_b if p not in flat_a]
    if extra:
        raise InputError(f"parameter {extra[0]} exists only in {names[1]}: the two trees differ in structure")


def _check_lambda(lam, extrapolate: bool) -> None:
    if jnp.ndim(lam) != 0:
        raise ValueError(f"lam must be a scalar (one lambda for the whole tree), got shape {jnp.shape(lam)}")
    try:
        value = float(lam)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return  # traced inside the caller's jit: cannot be checked here
    if not extrapolate and not 0.0 <= value <= 1.0:
        raise ValueError(f"lam={value} is outside [0, 1]; pass extrapolate=True to go beyond the endpoints")


def _mix(a: Params, b: Params, lam: jax.Array) -> Params:
    # (1 - lam) * x + lam * y rather than x + lam * (y - x): both endpoints come out bit-exact.
    def mix(x, y):
        return ((1 - lam) * x.astype(jnp.float32) + lam * y.astype(jnp.float32)).astype(x.dtype)

    return jax.tree.map(mix, a, b)


def _shift(a: Params, tau: Params, lam: jax.Array) -> Params:
    return jax.tree.map(lambda x, t: (x.astype(jnp.float32) + lam * t.astype(jnp.float32)).astype(x.dtype), a, tau)


def _jit_with_donating_twin(fn):
    """``fn`` jitted, plus a twin whose extra first argument's buffers are donated to the result."""
    return jax.jit(fn), jax.jit(lambda out, *args: fn(*args), donate_argnums=0, keep_unused=True)


_mix_jit, _mix_into = _jit_with_donating_twin(_mix)
_shift_jit, _shift_into = _jit_with_donating_twin(_shift)


@jax.jit
def task_vector(theta_instruct: Params, theta_thinking: Params) -> Params:
    """tau = theta_T - theta_I in float32 (exact for bf16 weights, so lam=1 recovers theta_T)."""
    return jax.tree.map(lambda x, y: y.astype(jnp.float32) - x.astype(jnp.float32), theta_instruct, theta_thinking)


def interpolate(
    theta_instruct: Params,
    theta_thinking: Params | None = None,
    lam: float | jax.Array = 0.5,
    *,
    task_vector: Params | None = None,
    out: Params | None = None,
    extrapolate: bool = False,
) -> Params:
    """theta(lam) between the Instruct (lam=0) and Thinking (lam=1) parameter trees.

    - lam = 0 and lam = 1 return the endpoints bit-for-bit.
    - ``task_vector`` (from :func:`task_vector`) replaces ``theta_thinking``: exact at lam=0,
      and at lam=1 whenever theta_I + tau is exact in float32 (always for bf16 weights).
    - ``out``: a previous theta(lam) whose buffers are donated and reused, so switching lambda
      allocates no third model. ``out`` is invalid afterwards; use the return value. It may not
      share a buffer with an input tree.
    - ``lam`` is one scalar for the whole tree.
    """
    _check_lambda(lam, extrapolate)
    lam = jnp.asarray(lam, jnp.float32)
    if (theta_thinking is None) == (task_vector is None):
        raise ValueError("interpolate: give exactly one of theta_thinking or task_vector")
    if task_vector is not None:
        check_compatible(theta_instruct, task_vector, ("theta_instruct", "task_vector"), same_dtype=False)
        other, plain, into = task_vector, _shift_jit, _shift_into
    else:
        check_compatible(theta_instruct, theta_thinking)
        other, plain, into = theta_thinking, _mix_jit, _mix_into
    if out is None:
        return plain(theta_instruct, other, lam)
    check_compatible(theta_instruct, out, ("theta_instruct", "out"))
    _check_not_aliased(out, theta_instruct=theta_instruct, **{"task_vector" if task_vector is not None else "theta_thinking": other})
    return into(out, theta_instruct, other, lam)


def _check_not_aliased(out: Params, **inputs: Params) -> None:
    """``out``'s buffers are donated (overwritten): none of them may be an input's."""
    out_leaves = {id(x) for x in jax.tree.leaves(out)}
    for name, tree in inputs.items():
        shared = [path_str(p) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if id(x) in out_leaves]
        if shared:
            raise ValueError(
                f"out: shares parameter {shared[0]} with {name}; out's buffers are overwritten, so pass a "
                "previous result of interpolate (or None), never an input tree"
            )
