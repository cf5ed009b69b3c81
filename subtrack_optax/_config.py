"""The options of :func:`subtrack_optax.subtrack`: validation and a frozen config."""

import dataclasses
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from optax._src import utils as optax_utils

from subtrack_optax import _equations
from subtrack_optax import _plans

__all__ = ["Config", "SUBSPACE_UPDATES", "BASIS_SIDES", "STATIC_ARGS"]

SUBSPACE_UPDATES = ("grassmann", "svd", "random", "frozen")
BASIS_SIDES = ("small", "large")
# Arguments that fix shapes or Python control flow; pass them as
# ``static_args`` to ``optax.inject_hyperparams``.
STATIC_ARGS = ("rank", "subspace_update", "normalize_tracking",
               "transport_moments", "recovery_scaling", "basis_side",
               "dimension_numbers", "basis_dtype", "mu_dtype", "stagger")
# The numeric options that optax.inject_hyperparams may turn into arrays.
HYPERPARAMETERS = ("step_size", "scale", "b1", "b2", "eps",
                   "norm_growth_limit", "update_interval", "seed")


def _is_real_number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check(name, value, ok, accepted):
  """Validates a Python number; traced/array values are left alone (they
  come from ``optax.inject_hyperparams``); anything else is a TypeError."""
  if isinstance(value, (jax.Array, np.ndarray, np.generic)) and not (
      isinstance(value, np.generic) and _is_real_number(value.item())):
    return
  if not _is_real_number(value):
    raise TypeError(f"subtrack: {name} must be a real number, got "
                    f"{type(value).__name__} {value!r}")
  if not ok(value):
    raise ValueError(f"subtrack: {name} must be {accepted}, got {value!r}")


def _static(name, value):
  """A traced/array value where a Python constant is needed (typically an
  argument ``optax.inject_hyperparams`` turned into an array)."""
  if isinstance(value, (jax.Array, np.ndarray)):
    raise ValueError(
        f"subtrack: {name} fixes shapes or control flow and must be a Python "
        f"constant, got an array {value!r}; with optax.inject_hyperparams "
        "pass static_args=subtrack_optax.STATIC_ARGS")


def _positive_int(name, value):
  _static(name, value)
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value <= 0):
    raise ValueError(f"subtrack: {name} must be a positive int, got {value!r}")


def _int_hyperparameter(name, value, minimum: int):
  """A Python int ``>= minimum``, or an integer scalar array (traced, from
  ``optax.inject_hyperparams``; it only enters scalar arithmetic)."""
  if isinstance(value, (jax.Array, np.ndarray)):
    if jnp.ndim(value) != 0 or not jnp.issubdtype(jnp.result_type(value),
                                                  jnp.integer):
      raise TypeError(f"subtrack: {name} must be an int or an integer "
                      f"scalar array, got {value!r}")
    return
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < minimum):
    what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    raise ValueError(f"subtrack: {name} must be {what}, got {value!r}")


def _choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"subtrack: {name} must be one of {choices}, got "
                     f"{value!r}")


def _form(name, value, forms) -> Optional[str]:
  """``True`` -> the first (default) form, ``False`` -> None, or a name."""
  if value is True or value is False:
    return forms[0] if value else None
  if isinstance(value, str) and value in forms:
    return value
  raise ValueError(f"subtrack: {name} must be True, False or one of {forms}, "
                   f"got {value!r}")


def _check_dimension_numbers(dimension_numbers):
  """None, a spec, a callable, or a pytree whose leaves are specs or None."""
  is_spec = lambda x: x is None or isinstance(
      x, _plans.SubTrackDimensionNumbers)
  ok = dimension_numbers is None or callable(dimension_numbers)
  if not ok and not isinstance(dimension_numbers, (str, bytes)):
    leaves = jax.tree.leaves(dimension_numbers, is_leaf=is_spec)
    ok = (not jax.tree_util.all_leaves([dimension_numbers])
          or is_spec(dimension_numbers)) and all(map(is_spec, leaves))
  if not ok:
    raise ValueError("subtrack: dimension_numbers must be None, a "
                     "SubTrackDimensionNumbers, a pytree of them (None = "
                     f"dense) or a callable, got {dimension_numbers!r}")


def _check_dtype(name, dtype):
  try:
    dt = jnp.dtype(dtype)
  except TypeError as e:
    raise TypeError(f"subtrack: {name} must be a dtype, got {dtype!r}") from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"subtrack: {name} must be a floating dtype, got {dt}")


@dataclasses.dataclass(frozen=True)
class Config:
  """The validated options of one :func:`subtrack` (see its docstring).

  ``transport`` and ``recovery`` are the named forms (``None`` = off) of
  ``transport_moments`` and ``recovery_scaling``; ``gram_correction`` says
  that the stored basis is narrower than float32, so ``S^T S != I`` to
  rounding and the recovery norm keeps the ``r x r`` Gram.
  """

  rank: int
  update_interval: int
  subspace_update: str
  step_size: Any
  normalize_tracking: bool
  scale: Any
  b1: Any
  b2: Any
  eps: Any
  transport: Optional[str]
  recovery: Optional[str]
  norm_growth_limit: Any
  basis_side: str
  dimension_numbers: Any
  basis_dtype: Any
  mu_dtype: Any
  seed: int
  stagger: bool

  @property
  def gram_correction(self) -> bool:
    return self.basis_dtype.itemsize < 4

  @property
  def residual_scale(self):
    """``c`` of the recovery residual ``X - c S P``."""
    return self.scale if self.recovery == "reference" else 1.0

  @classmethod
  def create(cls, rank, update_interval, *, subspace_update, step_size,
             normalize_tracking, scale, b1, b2, eps, transport_moments,
             recovery_scaling, norm_growth_limit, basis_side,
             dimension_numbers, basis_dtype, mu_dtype, seed,
             stagger) -> "Config":
    """Validates every option (errors name the argument) and builds it."""
    _positive_int("rank", rank)
    _int_hyperparameter("update_interval", update_interval, 1)
    _choice("subspace_update", subspace_update, SUBSPACE_UPDATES)
    _choice("basis_side", basis_side, BASIS_SIDES)
    _check("step_size", step_size, lambda v: 0 <= v < float("inf"),
           "finite and >= 0")
    _check("scale", scale, lambda v: 0 < v < float("inf"), "finite and > 0")
    _check("b1", b1, lambda v: 0 <= v < 1, "in [0, 1)")
    _check("b2", b2, lambda v: 0 <= v < 1, "in [0, 1)")
    _check("eps", eps, lambda v: 0 <= v < float("inf"), "finite and >= 0")
    _check("norm_growth_limit", norm_growth_limit, lambda v: v >= 1, ">= 1")
    _int_hyperparameter("seed", seed, -2**31)
    _check_dimension_numbers(dimension_numbers)
    _check_dtype("basis_dtype", basis_dtype)
    if mu_dtype is not None:
      _check_dtype("mu_dtype", mu_dtype)
    return cls(
        rank=int(rank), update_interval=update_interval,
        subspace_update=subspace_update, step_size=step_size,
        normalize_tracking=normalize_tracking, scale=scale, b1=b1, b2=b2,
        eps=eps,
        transport=_form("transport_moments", transport_moments,
                        _equations.TRANSPORTS),
        recovery=_form("recovery_scaling", recovery_scaling,
                       _equations.RECOVERIES),
        norm_growth_limit=norm_growth_limit, basis_side=basis_side,
        dimension_numbers=dimension_numbers,
        basis_dtype=jnp.dtype(basis_dtype),
        mu_dtype=optax_utils.canonicalize_dtype(mu_dtype), seed=seed,
        stagger=stagger)

  def traced_hyperparameters(self) -> dict:
    """The options of :data:`HYPERPARAMETERS` that are traced (injected by
    ``optax.inject_hyperparams`` inside a jit, grad, ...), by name."""
    return {n: getattr(self, n) for n in HYPERPARAMETERS
            if isinstance(getattr(self, n), jax.core.Tracer)}

  def plans(self, tree):
    """The tree of leaf plans of ``tree`` (params or updates)."""
    return _plans.resolve_plans(tree, self.dimension_numbers, self.rank,
                                self.basis_side)
