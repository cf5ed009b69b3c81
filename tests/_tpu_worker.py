"""XLA:TPU compiles of a small LLaMA's update and train step (issue 21).

Run by tests/test_tpu_aot.py in a subprocess (libtpu is loaded once per
process). Compiles, with the real XLA:TPU compiler on an abstract
``v5e:2x2`` slice (4 chips, no TPU needed), through
``benchmarks/tpu_aot.py``'s own case function: subtrack's update and train
step, AdamW's train step and subtrack's update in explicit-sharding mode
(the 60m widths, 2 layers, vocabulary 32000, FSDP), and, as a probe that
the custom-call check can fail, a program that calls ``jnp.linalg.qr``.
Prints one JSON object on its last stdout line.
"""

import importlib.util
import json
import os
import pathlib
import sys

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = {"size": "60m", "layers": 2, "layers_used": 2, "topology": "v5e:2x2",
        "batch": 8}


def _module():
  spec = importlib.util.spec_from_file_location(
      "tpu_aot", ROOT / "benchmarks" / "tpu_aot.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _qr_probe(aot) -> list:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  topo = topologies.get_topology_desc(SPEC["topology"], "tpu")
  mesh = jax.sharding.Mesh(topo.devices, ("fsdp",))
  a = jax.ShapeDtypeStruct((256, 64), jnp.float32,
                           sharding=NamedSharding(mesh, P()))
  text = jax.jit(lambda a: jnp.linalg.qr(a)[0]).lower(a).compile().as_text()
  return aot.linalg_calls(text)


def main():
  aot = _module()
  out = {"qr_probe": _qr_probe(aot)}
  for opt, what, explicit in (("subtrack", "update", False),
                              ("subtrack", "train", False),
                              ("adamw", "train", False),
                              ("subtrack", "update", True)):
    name = f"{opt} {what}" + (" explicit" if explicit else "")
    print(f"compiling {name}", file=sys.stderr, flush=True)
    r = aot._case({**SPEC, "optimizer": opt, "what": what,  # pylint: disable=protected-access
                   "explicit": explicit})
    r["large_collectives"] = len(r["large_collectives"])
    out[name] = r
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
