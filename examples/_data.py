"""Byte-level training data that needs no download.

The default corpus is text every Python installation has: the standard
library's ``.py`` sources and its ``.txt``/``.rst`` documentation files (under
``sysconfig.get_paths()["stdlib"]``, without ``site-packages``), read in
sorted path order. A file goes to the eval split when the CRC32 of its
relative path is ``0 mod 20`` (about 5% of files), so the split does not
depend on the cap or on which files exist. Files are separated by a NUL byte
(token 0). Different Python versions ship different sources, so record the
Python version with any number measured on this corpus.

Batches are a pure function of ``(seed, step)``, so a resumed run sees
exactly the data an uninterrupted run would.
"""

from __future__ import annotations

import functools
import os
import sysconfig
import zlib

import numpy as np

__all__ = ["Corpus", "default_corpus", "load_path", "train_batch",
           "eval_batches"]

TEXT_SUFFIXES = (".py", ".txt", ".rst")
EVAL_MOD = 20
SEPARATOR = b"\x00"


class Corpus:
  """Train and eval token streams (``uint8`` arrays) and where they came from."""

  def __init__(self, train: np.ndarray, eval_: np.ndarray, source: str,
               n_files: int):
    if len(train) < 2 or len(eval_) < 2:
      raise ValueError(f"corpus {source!r} is too small: {len(train)} train "
                       f"and {len(eval_)} eval bytes")
    self.train = train
    self.eval = eval_
    self.source = source
    self.n_files = n_files

  def __repr__(self):
    return (f"Corpus({self.source!r}, files={self.n_files}, "
            f"train={len(self.train) / 1e6:.2f}MB, "
            f"eval={len(self.eval) / 1e6:.2f}MB)")


def _is_eval(rel_path: str) -> bool:
  return zlib.crc32(rel_path.replace(os.sep, "/").encode()) % EVAL_MOD == 0


def _list_files(root: str, suffixes=None, skip_dirs=()) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    rel_dir = os.path.relpath(dirpath, root)
    dirnames[:] = sorted(
        d for d in dirnames
        if d != "__pycache__" and not d.startswith(".")
        and not (rel_dir == "." and d in skip_dirs))
    for f in filenames:
      if suffixes is None or f.endswith(suffixes):
        out.append(os.path.relpath(os.path.join(dirpath, f), root))
  return sorted(out, key=lambda p: p.replace(os.sep, "/"))


def _read_split(root: str, rel_paths, max_bytes: int, binary_check: bool):
  chunks = {"train": [], "eval": []}
  sizes = {"train": 0, "eval": 0}
  caps = {"train": max_bytes, "eval": max(max_bytes // 16, 1 << 16)}
  n = 0
  for rel in rel_paths:
    split = "eval" if _is_eval(rel) else "train"
    if sizes[split] >= caps[split]:
      if all(sizes[s] >= caps[s] for s in sizes):
        break
      continue
    try:
      with open(os.path.join(root, rel), "rb") as f:
        data = f.read(caps[split] - sizes[split])
    except OSError:
      continue
    if binary_check and b"\x00" in data[:8192]:
      continue
    chunks[split].append(data + SEPARATOR)
    sizes[split] += len(data) + 1
    n += 1
  as_array = lambda c: np.frombuffer(b"".join(c), np.uint8)
  return as_array(chunks["train"]), as_array(chunks["eval"]), n


@functools.lru_cache(maxsize=4)
def default_corpus(max_mb: float = 16.0) -> Corpus:
  """The standard library's sources and docs text, split by path hash.

  Args:
    max_mb: cap of the train split in MB (the eval split is capped at 1/16 of
      it); files are taken in sorted path order until the cap.

  Returns:
    A :class:`Corpus`.
  """
  root = sysconfig.get_paths()["stdlib"]
  files = _list_files(root, TEXT_SUFFIXES,
                      skip_dirs=("site-packages", "dist-packages"))
  train, eval_, n = _read_split(root, files, int(max_mb * 1e6),
                                binary_check=False)
  return Corpus(train, eval_, f"python-stdlib:{root}", n)


@functools.lru_cache(maxsize=4)
def load_path(path: str, max_mb: float = 16.0) -> Corpus:
  """A text file or a folder of text files as a byte corpus.

  A folder is read like the default corpus (every regular file that has no
  NUL byte in its first 8 KB, sorted, split by path hash; if that leaves
  either split empty, the last 5% of the bytes are the eval split). A single
  file is split at 95% of its length.

  Args:
    path: a file or a directory.
    max_mb: cap of the train split in MB.

  Returns:
    A :class:`Corpus`.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    files = _list_files(path)
    train, eval_, n = _read_split(path, files, int(max_mb * 1e6),
                                  binary_check=True)
    if len(train) >= 2 and len(eval_) >= 2:
      return Corpus(train, eval_, path, n)
    data = np.concatenate([train, eval_])
  elif os.path.isfile(path):
    with open(path, "rb") as f:
      data = np.frombuffer(f.read(int(max_mb * 1e6 * 1.0625)), np.uint8)
    n = 1
  else:
    raise FileNotFoundError(f"--data {path!r}: no such file or directory")
  cut = int(len(data) * 0.95)
  return Corpus(data[:cut], data[cut:], path, n)


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
  idx = starts[:, None] + np.arange(length)[None, :]
  return tokens[idx % len(tokens)].astype(np.int32)


def train_batch(tokens: np.ndarray, step: int, seed: int, batch_size: int,
                seq_len: int) -> np.ndarray:
  """The training batch of ``step``: ``(batch_size, seq_len + 1)`` int32.

  Random windows whose offsets depend only on ``(seed, step)``.
  """
  rng = np.random.default_rng([seed, step])
  high = max(len(tokens) - seq_len - 1, 1)
  return _windows(tokens, rng.integers(0, high, batch_size), seq_len + 1)


def eval_batches(tokens: np.ndarray, n_batches: int, batch_size: int,
                 seq_len: int) -> np.ndarray:
  """``(n_batches, batch_size, seq_len + 1)`` int32 evenly spaced windows."""
  n = n_batches * batch_size
  high = max(len(tokens) - seq_len - 1, 1)
  starts = np.linspace(0, high - 1, n).astype(np.int64)
  return _windows(tokens, starts, seq_len + 1).reshape(
      n_batches, batch_size, seq_len + 1)
