"""A LLaMA decoder in Flax NNX, and its configurations.

RMSNorm (pre-norm), rotary position embeddings, SwiGLU feed-forward, no
biases, untied input embedding and output head (Touvron et al. 2023). Every
linear map is a 2-D ``(in, out)`` kernel, so the attention and MLP matrices
are exactly the leaves a low-rank optimizer projects (see
:func:`projected_paths`).

The paper-size shapes (hidden / intermediate / heads / layers) are those of
Table 4 of the SubTrack++ paper (arXiv 2502.01586), which reuses the GaLore
paper's LLaMA configurations (arXiv 2403.03507, Table 5; the reference code's
``configs/llama_*.json`` agree for 60m-1b and 7b). The paper trains with a
32000-token T5 tokenizer; this example uses bytes (vocabulary 256), so the
embedding and head are smaller and the parameter counts below are those of
the byte-level model.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from _configs import CONFIGS
from _configs import LlamaConfig

__all__ = ["LlamaConfig", "CONFIGS", "Llama", "projected_paths", "count_params"]


_INIT = nnx.initializers.normal(0.02)


def rotary(x: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding of ``x`` ``(batch, seq, heads, head_dim)``.

  Pairs ``(x_i, x_{i + h/2})`` are rotated by ``pos * base^(-2i/h)``.
  """
  _, seq, _, dim = x.shape
  half = dim // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / dim)
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _linear(n_in, n_out, rngs, dtype=None):
  return nnx.Linear(n_in, n_out, use_bias=False, kernel_init=_INIT,
                    dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
  """Causal multi-head self-attention with rotary embeddings, no biases."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, dtype=None):
    self.heads = cfg.heads
    self.head_dim = cfg.head_dim
    self.q = _linear(cfg.hidden, cfg.hidden, rngs, dtype)
    self.k = _linear(cfg.hidden, cfg.hidden, rngs, dtype)
    self.v = _linear(cfg.hidden, cfg.hidden, rngs, dtype)
    self.o = _linear(cfg.hidden, cfg.hidden, rngs, dtype)

  def __call__(self, x):
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, self.heads, self.head_dim)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    q, k = rotary(q), rotary(k)
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.o(y.reshape(b, t, self.heads * self.head_dim))


class MLP(nnx.Module):
  """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, dtype=None):
    self.gate = _linear(cfg.hidden, cfg.intermediate, rngs, dtype)
    self.up = _linear(cfg.hidden, cfg.intermediate, rngs, dtype)
    self.down = _linear(cfg.intermediate, cfg.hidden, rngs, dtype)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  """Pre-norm decoder block."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, dtype=None):
    self.attn_norm = nnx.RMSNorm(cfg.hidden, epsilon=1e-6, dtype=dtype,
                                 rngs=rngs)
    self.attn = Attention(cfg, rngs, dtype)
    self.mlp_norm = nnx.RMSNorm(cfg.hidden, epsilon=1e-6, dtype=dtype,
                                rngs=rngs)
    self.mlp = MLP(cfg, rngs, dtype)

  def __call__(self, x):
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
  """LLaMA decoder: embedding, blocks, final RMSNorm, linear head.

  Parameters are float32; ``dtype`` (e.g. ``jnp.bfloat16``) is the compute
  dtype of the activations (``None``: float32). Logits are float32.
  ``remat``: recompute each block's activations in the backward pass
  (:func:`flax.nnx.remat`) instead of keeping them.

  Example:
    >>> from flax import nnx
    >>> model = Llama(CONFIGS["tiny"], nnx.Rngs(0))
    >>> model(jnp.zeros((2, 16), jnp.int32)).shape
    (2, 16, 256)
  """

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, dtype=None,
               remat: bool = False):
    self.remat = remat
    self.embed = nnx.Embed(cfg.vocab, cfg.hidden, embedding_init=_INIT,
                           dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs, dtype)
                            for _ in range(cfg.layers)])
    self.norm = nnx.RMSNorm(cfg.hidden, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.head = _linear(cfg.hidden, cfg.vocab, rngs, dtype)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      # remat: keep only each block's input for the backward pass (the
      # paper's 7B train step does not fit a 16 GiB chip otherwise).
      x = nnx.remat(lambda b, x: b(x))(block, x) if self.remat else block(x)
    return self.head(self.norm(x)).astype(jnp.float32)


def _path_names(path) -> tuple[str, ...]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
  return tuple(out)


def is_projected_path(path) -> bool:
  """True for the kernels of attention (q, k, v, o) and MLP (gate, up, down)."""
  names = _path_names(path)
  return ("attn" in names or "mlp" in names) and names[-1] == "kernel"


def projected_paths(params, spec, dense=None):
  """``params``-shaped tree: ``spec`` at attention/MLP kernels, else ``dense``.

  Use it as the ``dimension_numbers`` of ``subtrack`` (with
  ``SubTrackDimensionNumbers(0, 1)``) or optax GaLore's
  ``weight_dimension_numbers``: embeddings, norms and the head stay dense, as
  in the paper.
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, _: spec if is_projected_path(p) else dense, params)


def count_params(cfg: LlamaConfig) -> int:
  """Number of parameters of the byte-level model."""
  h, i = cfg.hidden, cfg.intermediate
  per_block = 4 * h * h + 3 * h * i + 2 * h
  return cfg.layers * per_block + 2 * cfg.vocab * h + h


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
  """Approximate training FLOPs per token (6N + attention)."""
  n = count_params(cfg) - cfg.vocab * cfg.hidden
  return 6.0 * n + 12.0 * cfg.layers * cfg.hidden * seq_len
