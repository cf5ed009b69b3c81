"""The LLaMA sizes of the example (no jax: the command line reads them
before jax is imported).

The paper-size shapes (hidden / intermediate / heads / layers) are those of
Table 4 of the SubTrack++ paper (arXiv 2502.01586), which reuses the GaLore
paper's LLaMA configurations (arXiv 2403.03507, Table 5).
"""

from __future__ import annotations

import dataclasses

__all__ = ["LlamaConfig", "CONFIGS"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shapes of the model and the default run for one size.

  Attributes:
    hidden: model width.
    intermediate: SwiGLU hidden width.
    heads: attention heads (``hidden % heads == 0``).
    layers: decoder blocks.
    vocab: vocabulary size (256 bytes).
    seq_len: default training sequence length.
    batch_size: default sequences per step.
    rank: default projection rank (``hidden / 4``, as the paper's 60m-1b runs).
    update_interval: default steps between subspace updates.
    lr: default peak learning rate.
    steps: default number of training steps.
  """

  hidden: int
  intermediate: int
  heads: int
  layers: int
  vocab: int = 256
  seq_len: int = 256
  batch_size: int = 64
  rank: int = 128
  update_interval: int = 200
  lr: float = 1e-3
  steps: int = 10_000

  @property
  def head_dim(self) -> int:
    return self.hidden // self.heads


CONFIGS = {
    # Laptop sizes.
    "tiny": LlamaConfig(hidden=64, intermediate=176, heads=4, layers=2,
                        seq_len=64, batch_size=8, rank=8, update_interval=10,
                        lr=3e-3, steps=100),
    "small": LlamaConfig(hidden=128, intermediate=352, heads=4, layers=4,
                         seq_len=64, batch_size=16, rank=32,
                         update_interval=25, lr=3e-3, steps=200),
    # The paper's shapes (SubTrack++ Table 4 / GaLore Table 5).
    "60m": LlamaConfig(hidden=512, intermediate=1376, heads=8, layers=8,
                       rank=128, steps=10_000),
    "130m": LlamaConfig(hidden=768, intermediate=2048, heads=12, layers=12,
                        rank=256, steps=20_000),
    "350m": LlamaConfig(hidden=1024, intermediate=2736, heads=16, layers=24,
                        rank=256, steps=60_000),
    "1b": LlamaConfig(hidden=2048, intermediate=5461, heads=32, layers=24,
                      rank=512, steps=100_000),
    "3b": LlamaConfig(hidden=2560, intermediate=6848, heads=32, layers=32,
                      rank=512, steps=100_000),
    "7b": LlamaConfig(hidden=4096, intermediate=11008, heads=32, layers=32,
                      rank=1024, steps=150_000),
}
