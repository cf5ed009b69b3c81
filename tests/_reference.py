"""A float64 NumPy reference of SubTrack++, written from SPEC.md sections 2-3.

Deliberately independent of the library: dense LAPACK SVDs, explicit
residuals, per-slice Python loops.
"""

from __future__ import annotations

import numpy as np


def top_left(x: np.ndarray, r: int) -> np.ndarray:
  u, _, _ = np.linalg.svd(x, full_matrices=False)
  return u[:, :r]


def track(s, x, step_size, normalize):
  if normalize and np.linalg.norm(x) > 0:
    x = x / np.linalg.norm(x)
  a = s.T @ x
  d = -2.0 * (x - s @ a) @ a.T
  t = d - s @ (s.T @ d)
  u_, sig, vt = np.linalg.svd(t, full_matrices=False)
  u, sigma, v = u_[:, 0], sig[0], vt[0]
  if sigma == 0 or not np.all(np.isfinite(t)):
    return s
  theta = step_size * sigma
  return s + np.outer(s @ v * (np.cos(theta) - 1.0) - u * np.sin(theta), v)


class RefMatrix:
  """State and step of one projected matrix in its canonical frame."""

  def __init__(self, d, big_d, r, cfg):
    self.r, self.cfg = r, cfg
    self.s = np.zeros((d, r))
    self.m = np.zeros((r, big_d))
    self.v = np.zeros((r, big_d))
    self.prev = 0.0

  def step(self, t, x, library_basis=None):
    """One step; ``library_basis`` is the library's basis after this step.

    It is used for what the spec leaves open: the signs of SVD columns
    (aligned to the library's) and the draw of the ``random`` mode.
    """
    c = self.cfg
    k = c["update_interval"]
    align = lambda s: s * np.sign(np.sum(s * library_basis, axis=0))
    if t == 0:
      self.s = align(top_left(x, self.r))
    elif t % k == 0:
      s_old = self.s
      mode = c["subspace_update"]
      if mode == "grassmann":
        self.s = track(s_old, x, c["step_size"], c["normalize_tracking"])
      elif mode == "svd":
        self.s = align(top_left(x, self.r))
      elif mode == "random":
        self.s = library_basis
      form = c["transport_moments"]
      if form and mode != "frozen":
        cc = self.s.T @ s_old
        m_old = self.m
        self.m = cc @ m_old
        if form == "debiased":   # LDAdam's form on bias-corrected moments
          rho = (1 - c["b2"] ** t) / (1 - c["b1"] ** t) ** 2
          self.v = np.maximum((cc * cc) @ (self.v - rho * m_old * m_old)
                              + rho * (cc @ m_old) ** 2, 0.0)
        elif form == "reference":  # the reference code's (1-b2)|...|
          self.v = (1 - c["b2"]) * np.abs((cc * cc) @ (self.v - m_old * m_old)
                                          + (cc @ m_old) ** 2)
        elif form == "reset":    # V's history dropped (the floor remains)
          self.v = np.zeros_like(self.v)
        else:                    # True or "ldadam"
          self.v = np.maximum((cc * cc) @ (self.v - m_old * m_old)
                              + (cc @ m_old) ** 2, 0.0)
        # Adam's invariant M^2 <= K V kept through the transport.
        b1, b2 = c["b1"], c["b2"]
        kappa = (min(1.0, (1 - b1) ** 2 / ((1 - b2) * (1 - b1 * b1 / b2)))
                 if b1 * b1 < b2 else 1.0)
        self.v = np.maximum(self.v, self.m ** 2 / kappa)
    b1, b2, eps = c["b1"], c["b2"], c["eps"]
    p = self.s.T @ x
    self.m = b1 * self.m + (1 - b1) * p
    self.v = b2 * self.v + (1 - b2) * p * p
    mh = self.m / (1 - b1 ** (t + 1))
    vh = self.v / (1 - b2 ** (t + 1))
    n = mh / (np.sqrt(vh) + eps)
    u = c["scale"] * self.s @ n
    if c["recovery_scaling"]:
      phi = np.linalg.norm(n, axis=0) / (np.linalg.norm(p, axis=0) + 1e-8)
      # "reference": the reference code's residual X - scale S S^T X.
      c_res = c["scale"] if c["recovery_scaling"] == "reference" else 1.0
      lam = (x - c_res * self.s @ p) * phi[None, :]
      norm = np.linalg.norm(lam)
      zeta = c["norm_growth_limit"]
      if t > 0 and norm > zeta * self.prev:
        lam = lam * zeta * self.prev / norm
      self.prev = np.linalg.norm(lam)
      u = u + lam
    return u


class RefAdam:

  def __init__(self, shape, cfg):
    self.cfg = cfg
    self.m = np.zeros(shape)
    self.v = np.zeros(shape)

  def step(self, t, g, library_basis=None):
    b1, b2, eps = self.cfg["b1"], self.cfg["b2"], self.cfg["eps"]
    self.m = b1 * self.m + (1 - b1) * g
    self.v = b2 * self.v + (1 - b2) * g * g
    return (self.m / (1 - b1 ** (t + 1))) / (
        np.sqrt(self.v / (1 - b2 ** (t + 1))) + eps)


class RefLeaf2D:
  """A (batch..., m, n) leaf: one RefMatrix per batch slice, or dense."""

  def __init__(self, shape, r, cfg):
    self.shape = shape
    self.projected = len(shape) >= 2 and min(shape[-2:]) > r
    if not self.projected:
      self.dense = RefAdam(shape, cfg)
      return
    m, n = shape[-2:]
    if cfg["basis_side"] == "small":
      self.transpose = not m <= n
    else:
      self.transpose = not m >= n
    d, big_d = (n, m) if self.transpose else (m, n)
    self.batch = shape[:-2]
    self.mats = {idx: RefMatrix(d, big_d, r, cfg)
                 for idx in np.ndindex(*self.batch)}

  def step(self, t, g, library_basis=None):
    if not self.projected:
      return self.dense.step(t, g)
    out = np.zeros(self.shape)
    for idx, mat in self.mats.items():
      x = g[idx].T if self.transpose else g[idx]
      u = mat.step(t, x, library_basis[idx])
      out[idx] = u.T if self.transpose else u
    return out
