"""The frame of a projected leaf: every orientation decision in one place.

A projected leaf ``g`` is seen three ways:

- as it lies, ``(...)`` in the parameter's own shape;
- *ordered*, ``(batch..., reduction..., output...)``: the leaf itself for
  the default rule (no copy); each batch slice is one item, seen as its
  *matrix* ``(m, n)`` (``m`` the product of the reduction axes, ``n`` of the
  output axes; a free reshape);
- in the *canonical frame* ``X``, ``(batch..., d, D)``: the basis side
  ``d`` first. ``X`` is the matrix itself when the basis spans the
  reduction side (``basis_on_reduction``), else its transpose.

The update works on the matrix as it lies (products are oriented so that
neither ``g`` nor the update is ever copied transposed); only the subspace
update forms ``X``, inside its branch. :class:`Frame` owns the choice.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from subtrack_optax import _plans
from subtrack_optax import _sharding

__all__ = ["Frame"]


@dataclasses.dataclass(frozen=True)
class Frame:
  """Orientation of one projected leaf, built from its :class:`LeafPlan`.

  Attributes:
    plan: the leaf's plan (``plan.projected`` is True).

  Example:
    >>> import jax.numpy as jnp
    >>> from subtrack_optax import _plans
    >>> plan = _plans.resolve_plans({"w": jnp.zeros((8, 4))}, None, 2,
    ...                             "small")["w"]
    >>> Frame(plan).canonical(jnp.ones((8, 4))).shape   # d = 4 rows
    (4, 8)
  """

  plan: _plans.LeafPlan

  @property
  def basis_on_rows(self) -> bool:
    """True if ``X`` is the matrix itself (basis on the reduction side)."""
    return self.plan.basis_on_reduction

  @property
  def _groups(self) -> tuple:
    plan = self.plan
    return (1,) * len(plan.batch_axes) + (len(plan.reduction_axes),
                                          len(plan.output_axes))

  @property
  def _perm(self) -> tuple:
    plan = self.plan
    return plan.batch_axes + plan.reduction_axes + plan.output_axes

  def canonical(self, g: jax.Array) -> jax.Array:
    """Leaf ``g`` -> ``X`` of shape ``(batch..., d, D)`` in float32."""
    plan, perm = self.plan, self._perm
    x = jnp.transpose(g, perm) if perm != tuple(range(len(perm))) else g
    # Explicit sharding: merged axes take their parts' mesh axes in order.
    x = x.reshape(plan.batch_shape + (plan.m, plan.n),
                  out_sharding=_sharding.merge_sharding(x, self._groups))
    return self.to_canonical(x.astype(jnp.float32))

  def ordered(self, g: jax.Array) -> jax.Array:
    """Leaf ``g`` with its axes in the order ``(batch..., reduction...,
    output...)``: ``g`` itself for the default rule (no copy)."""
    perm = self._perm
    return jnp.transpose(g, perm) if perm != tuple(range(len(perm))) else g

  def unordered(self, a: jax.Array) -> jax.Array:
    """The inverse of :meth:`ordered`."""
    perm = self._perm
    if perm == tuple(range(len(perm))):
      return a
    return jnp.transpose(a, np.argsort(perm))

  def item_matrix(self, a: jax.Array) -> jax.Array:
    """One batch slice of :meth:`ordered`, ``(reduction..., output...)``,
    as its matrix ``(m, n)``."""
    groups = self._groups[len(self.plan.batch_axes):]
    return a.reshape((self.plan.m, self.plan.n),
                     out_sharding=_sharding.merge_sharding(a, groups))

  def item_unmatrix(self, x: jax.Array) -> jax.Array:
    """The inverse of :meth:`item_matrix`."""
    plan = self.plan
    shape = tuple(plan.shape[a] for a in plan.reduction_axes + plan.output_axes)
    groups = self._groups[len(plan.batch_axes):]
    return x.reshape(shape, out_sharding=_sharding.split_sharding(
        x, shape, groups))

  def to_canonical(self, x: jax.Array) -> jax.Array:
    """A matrix ``(..., m, n)`` -> its canonical ``(..., d, D)``."""
    return x if self.basis_on_rows else jnp.swapaxes(x, -1, -2)

  def project(self, g: jax.Array, s: jax.Array) -> jax.Array:
    """``P = S^T X`` (``(batch..., r, D)``, float32) with matrix ``g`` as it lies.

    ``X = g`` on rows, else ``X = g^T`` and ``P^T = g S`` is a plain
    ``(D, d) x (d, r)`` product. The optimization barriers only pin the
    orientation: untransposed (row-major) operands, which XLA:CPU runs
    fastest, instead of XLA folding the small transposes back into the
    product; neither ``g`` nor ``P`` is copied transposed.
    """
    s = s.astype(jnp.float32)
    bar = jax.lax.optimization_barrier
    if self.basis_on_rows:
      return _sharding.sharded_matmul(bar(jnp.swapaxes(s, -1, -2)), g)
    return jnp.swapaxes(bar(_sharding.sharded_matmul(g, s)), -1, -2)

  def times_transposed(self, g: jax.Array, a: jax.Array) -> jax.Array:
    """``X A^T`` (``A``: ``(batch..., r, D)``; ``(batch..., d, r)``) with
    matrix ``g`` as it lies: ``g A^T`` on rows, else ``(A g)^T`` (a
    ``d x r`` transpose; ``g`` is not copied)."""
    mm = _sharding.sharded_matmul
    if self.basis_on_rows:
      return mm(g, jnp.swapaxes(a, -1, -2))
    return jnp.swapaxes(mm(a, g), -1, -2)

  def row_times(self, w: jax.Array, g: jax.Array) -> jax.Array:
    """``w^T X`` (``w``: ``(batch..., d)``; ``(batch..., D)``) with matrix
    ``g`` as it lies."""
    mm = _sharding.sharded_matmul
    if self.basis_on_rows:
      return mm(w[..., None, :], g)[..., 0, :]
    return mm(g, w[..., :, None])[..., 0]

  def basis_times(self, s: jax.Array, w: jax.Array) -> jax.Array:
    """``S W`` (``W``: ``(batch..., r, D)``) in the matrix's layout."""
    if self.basis_on_rows:
      return jnp.matmul(s, w)                                    # (d, D)
    return jnp.matmul(jnp.swapaxes(w, -1, -2), jnp.swapaxes(s, -1, -2))

  def col_sq_norms(self, g: jax.Array) -> jax.Array:
    """``||X_j||^2`` for each column ``j`` of ``X`` (``(batch..., D)``)."""
    return jnp.sum(g * g, axis=-2 if self.basis_on_rows else -1)

  def scale_columns(self, g: jax.Array, phi: jax.Array) -> jax.Array:
    """``X diag(phi)`` in the matrix's layout."""
    return (phi[..., None, :] if self.basis_on_rows else phi[..., :, None]) * g
