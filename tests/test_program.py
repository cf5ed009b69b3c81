"""The compiled update is a fixed program: optimized-HLO opcode counts.

Refactors of the package must leave the compiled update unchanged. The
counts are of a tree with wide, tall, stacked (scanned), 3-D
(attention-kernel) and dense leaves, in ``grassmann`` and ``svd`` modes, with
``stagger`` off and on (jax/jaxlib 0.10.2, CPU). A change that alters the
program must update the counts here and say why in the commit and in
``docs/architecture.md``'s change log.

History: first recorded before the architecture refactor (main 9dd2b9b); the
refactor (issue 10) left them unchanged. Re-recorded for the whole-model
engine (issue 20: items swept one at a time per group, projections after
the subspace update, moments transported in a gate of their own), whose
program is different by design; and for the transport's floor
``V' >= M'^2 / kappa`` (issue 12; four fewer constants/broadcasts) and the transport's
clamp of an overflowed ``V`` (issue 12 item 2). Re-recorded for the
whole-model sweep (issue 20, second step: one loop per group of same-layout
leaves carrying gradients and state, each item's subspace step and regular
step in its body; no per-leaf code but a pick branch and a put loop).
Re-recorded when the subspace update came to see the gradient only through
``X X^T Q`` and ``||X||`` (issue 20, third step: subspace iteration from a
start block in ``d``-space with Rayleigh-Ritz on ``Q^T X X^T Q``, the
geodesic step on ``Y = X_n X_n^T S``, ``svd`` mode's first basis and
refresh one code path, the transport in a gate inside the subspace gate),
and again for the optimization barrier through which the gate's body reads
the gradient (without it XLA hoisted ``svd`` mode's SVD, a function of the
gradient alone, out of the 0/1-trip loop: it ran on every step). Re-recorded
for the one-sided Jacobi eigensolver of the Rayleigh-Ritz step
(``_linalg.psd_eig``, issue 20: columns rotated only, half the code of a
two-sided round). Re-recorded when the start block and the eigensolver's
identity came to be computed in the program from iotas (an integer hash for
the block) instead of stored as NumPy-made constants (issue 21: three
copies of each, 144 MiB of every chip's peak at the 7B shapes).
Re-recorded (``grassmann`` only) when tracking came to reuse the regular
step's projection: ``P = S^T X`` is taken before the subspace update, the
geodesic step forms ``X_n X_n^T S`` from it and returns ``S'^T X = P + v
w^T X`` (one ``d x D x r`` product with the gradient instead of three on a
tracking step). Re-recorded (all modes) when the one-sided Jacobi came to
hold ``[A V; V]`` transposed, its columns as contiguous rows (a transpose
in and out of each eigensolver: 77 -> 53 us a round at ``k = 256`` on
XLA:CPU).

On another jax/jaxlib version XLA's passes differ, so the per-opcode counts
cannot be compared; there the total is checked against a 15% band instead.
"""

import collections
import math
import re

import jax
import jax.numpy as jnp
import jaxlib
import pytest

import subtrack_optax as st

RECORDED_WITH = "0.10.2"

PARAMS = {
    "wide": jnp.zeros((16, 48)),
    "tall": jnp.zeros((48, 16)),
    "stacked": jnp.zeros((3, 16, 32)),
    "attn": jnp.zeros((16, 2, 12)),   # (embed, heads, head_dim)
    "bias": jnp.zeros((48,)),
}
DIMS = {
    "wide": st.SubTrackDimensionNumbers(-2, -1),
    "tall": st.SubTrackDimensionNumbers(-2, -1),
    "stacked": st.SubTrackDimensionNumbers(-2, -1),
    "attn": st.SubTrackDimensionNumbers(0, (1, 2)),
    "bias": None,
}

RECORDED = {
    ('grassmann', False): {
        "abs": 24, "add": 305, "and": 88, "bitcast": 302, "broadcast": 607,
        "call": 4, "clamp": 2, "compare": 420, "concatenate": 8,
        "conditional": 12, "constant": 897, "convert": 41, "copy": 150,
        "cosine": 8, "divide": 72, "dot": 96, "dynamic-slice": 51,
        "dynamic-update-slice": 9, "fusion": 531, "gather": 12,
        "get-tuple-element": 334, "iota": 60, "is-finite": 24, "maximum":
        68, "minimum": 9, "multiply": 492, "negate": 4, "not": 4, "or": 8,
        "parameter": 1643, "power": 2, "reduce": 128, "reduce-window": 10,
        "remainder": 2, "rsqrt": 4, "select": 312, "shift-right-logical":
        16, "sign": 1, "sine": 20, "slice": 60, "sort": 4, "sqrt": 73,
        "subtract": 70, "transpose": 38, "tuple": 107, "while": 33, "xor":
        24},
    ('grassmann', True): {
        "abs": 24, "add": 320, "and": 106, "bitcast": 302, "broadcast": 607,
        "call": 4, "clamp": 5, "compare": 474, "concatenate": 8,
        "conditional": 12, "constant": 945, "convert": 50, "copy": 150,
        "cosine": 8, "divide": 72, "dot": 96, "dynamic-slice": 51,
        "dynamic-update-slice": 9, "fusion": 543, "gather": 12,
        "get-tuple-element": 334, "iota": 60, "is-finite": 24, "maximum":
        68, "minimum": 12, "multiply": 492, "negate": 4, "not": 4, "or": 8,
        "parameter": 1664, "power": 2, "reduce": 128, "reduce-window": 10,
        "remainder": 5, "rsqrt": 4, "select": 339, "shift-right-logical":
        16, "sign": 1, "sine": 20, "slice": 60, "sort": 4, "sqrt": 73,
        "subtract": 70, "transpose": 38, "tuple": 107, "while": 33, "xor":
        24},
    ('svd', False): {
        "abs": 20, "add": 185, "and": 40, "bitcast": 167, "broadcast": 325,
        "clamp": 1, "compare": 271, "concatenate": 8, "conditional": 4,
        "constant": 524, "convert": 16, "copy": 124, "divide": 40, "dot":
        44, "dynamic-slice": 42, "dynamic-update-slice": 9, "fusion": 327,
        "gather": 12, "get-tuple-element": 271, "iota": 21, "is-finite": 12,
        "maximum": 38, "minimum": 5, "multiply": 249, "negate": 4, "or": 4,
        "parameter": 1043, "power": 2, "reduce": 68, "reduce-window": 6,
        "remainder": 2, "rsqrt": 4, "select": 224, "shift-right-logical": 4,
        "sign": 1, "slice": 60, "sort": 4, "sqrt": 37, "subtract": 46,
        "transpose": 34, "tuple": 71, "while": 29, "xor": 12},
    ('svd', True): {
        "abs": 20, "add": 197, "and": 58, "bitcast": 167, "broadcast": 325,
        "clamp": 1, "compare": 328, "concatenate": 8, "conditional": 4,
        "constant": 569, "convert": 25, "copy": 124, "divide": 40, "dot":
        44, "dynamic-slice": 42, "dynamic-update-slice": 9, "fusion": 339,
        "gather": 12, "get-tuple-element": 271, "iota": 21, "is-finite": 12,
        "maximum": 38, "minimum": 8, "multiply": 249, "negate": 4, "or": 4,
        "parameter": 1064, "power": 2, "reduce": 68, "reduce-window": 6,
        "remainder": 5, "rsqrt": 4, "select": 251, "shift-right-logical": 4,
        "sign": 1, "slice": 60, "sort": 4, "sqrt": 37, "subtract": 46,
        "transpose": 34, "tuple": 71, "while": 29, "xor": 12},
}

_OPCODE = re.compile(r"\s*(?:ROOT\s+)?[%\w.\-]+\s*=\s*.*?\s([a-z][a-z0-9\-]*)\(")


def opcode_counts(hlo_text: str) -> dict:
  """Instructions per opcode in an HLO module's text (all computations)."""
  ops = collections.Counter()
  for line in hlo_text.splitlines():
    m = _OPCODE.match(line)
    if m:
      ops[m.group(1)] += 1
  return dict(ops)


def _compiled_counts(mode, stagger):
  tx = st.subtrack(4, 5, subspace_update=mode, stagger=stagger,
                   dimension_numbers=DIMS)
  state = tx.init(PARAMS)
  text = jax.jit(tx.update).lower(PARAMS, state).compile().as_text()
  return opcode_counts(text)


def test_opcode_counter_reads_hlo_text():
  text = """HloModule m
ENTRY %main (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  %a = f32[2]{0} add(f32[2]{0} %p, f32[2]{0} %p)
  ROOT %m.1 = f32[2]{0} multiply(f32[2]{0} %a, f32[2]{0} %p)
}"""
  assert opcode_counts(text) == {"parameter": 1, "add": 1, "multiply": 1}


@pytest.mark.parametrize("mode,stagger", sorted(RECORDED))
def test_compiled_update_program_unchanged(mode, stagger):
  got = _compiled_counts(mode, stagger)
  want = RECORDED[(mode, stagger)]
  if jaxlib.__version__ == RECORDED_WITH:
    diff = {op: (want.get(op, 0), got.get(op, 0))
            for op in set(want) | set(got)
            if want.get(op, 0) != got.get(op, 0)}
    assert not diff, f"opcode counts (recorded, now) changed: {diff}"
  else:
    total, recorded = sum(got.values()), sum(want.values())
    assert abs(total - recorded) <= 0.15 * recorded, (total, recorded)


@pytest.mark.parametrize("mode", ["grassmann", "svd", "random"])
def test_no_transposed_copy_of_a_gradient(mode):
  """A leaf whose basis spans its output side (``X = g^T``) is read as it
  lies: the subspace update sees ``X`` only through ``X X^T Q`` and
  ``||X||``, so no ``(n, m)`` transposed copy of the gradient is formed
  anywhere in the program, first step and refresh included."""
  params = {"tall": jnp.zeros((48, 16))}
  tx = st.subtrack(4, 5, subspace_update=mode)
  state = tx.init(params)
  text = jax.jit(tx.update).lower(params, state).compile().as_text()
  assert "f32[48,16]" in text           # the gradient itself, as it lies
  assert "f32[16,48]" not in text       # ... and never transposed


_DOT = re.compile(r"stablehlo\.dot_general.*precision = \[(\w+), (\w+)\]"
                  r" : \((.*)\) ->")


def lowered_update(params, mode: str = "grassmann") -> str:
  """The update's StableHLO text (what each operation asks for, before
  XLA's passes)."""
  tx = st.subtrack(4, 5, subspace_update=mode)
  return jax.jit(tx.update).lower(params, tx.init(params)).as_text()


def gradient_products(params, mode: str) -> list:
  """The precisions of every product with a gradient-sized operand in the
  lowered update (StableHLO: the precision each product asks for)."""
  text = lowered_update(params, mode)
  sizes = {"x".join(map(str, p.shape)) for p in params.values()}
  sizes |= {"x".join(map(str, p.shape[::-1])) for p in params.values()}
  out = []
  for m in _DOT.finditer(text):
    operands = re.findall(r"tensor<([\dx]+)x[fb]", m.group(3))
    if any(o in sizes for o in operands):
      out.append((m.group(1), m.group(2)))
  return out


@pytest.mark.parametrize("mode", ["grassmann", "svd"])
def test_gradient_products_at_default_precision(mode):
  """Products with a gradient-sized operand (the projection and the
  subspace update's ``X (X^T Q)``) ask for JAX's
  default precision, so ``jax.default_matmul_precision`` governs them all;
  at ``HIGHEST`` XLA:TPU compiled each into six bfloat16 passes and the
  1B update's compile took 1.8x as long (docs/performance.md)."""
  params = {"wide": jnp.zeros((32, 48)), "tall": jnp.zeros((48, 16))}
  got = gradient_products(params, mode)
  # per leaf: P = S^T X and the two products of each X X^T Q site
  assert len(got) >= 2 * 3, got
  assert set(got) == {("DEFAULT", "DEFAULT")}, got
  with jax.default_matmul_precision("highest"):
    assert set(gradient_products(params, mode)) == {("HIGHEST", "HIGHEST")}


def test_gradients_enter_through_one_barrier():
  """The projected gradients pass one optimization barrier, all together,
  before the sweeps read them: without it, in a train step at the 7B
  shapes on 256 TPU chips, XLA all-reduced every MLP gradient whole instead
  of reduce-scattering it (docs/sharding.md; that compile takes minutes,
  so the default suite checks the barrier itself)."""
  params = {"wide": jnp.zeros((32, 48)), "tall": jnp.zeros((48, 16)),
            "bias": jnp.zeros((5,))}
  entry = re.findall(r"stablehlo\.optimization_barrier (%arg[\d, %arg]+) :"
                     r" ([^\n]+)", lowered_update(params))
  assert len(entry) == 1, entry
  assert sorted(entry[0][1].split(", ")) == ["tensor<32x48xf32>",
                                             "tensor<48x16xf32>"]


_CONSTANT = re.compile(r"= ([a-z]\d*)\[([\d,]*)\]\S* constant\(")


def constant_sizes(hlo_text: str) -> list:
  """Element counts of the array constants in an HLO module's text."""
  return sorted(math.prod(int(d) for d in dims.split(",") if d)
                for _, dims in _CONSTANT.findall(hlo_text))


def test_constant_sizes_reads_hlo_text():
  text = """  %c = f32[64,32]{1,0} constant({...})
  %s = s32[] constant(3)
  %p = f32[64,32]{1,0} parameter(0)"""
  assert constant_sizes(text) == [1, 2048]


@pytest.mark.parametrize("mode", ["grassmann", "svd"])
def test_no_panel_sized_constant(mode):
  """The subspace iteration's start block and the eigensolver's identity
  are computed in the program, not stored in it: a NumPy-made block was a
  constant of the compiled update, one copy per branch that used it (at
  the 7B shapes on 256 TPU chips three 32 MiB start blocks and three 16
  MiB identities, 144 MiB of every chip's peak; docs/sharding.md)."""
  d, rank = 64, 16                       # start block (64, 32), eye (32, 32)
  params = {"wide": jnp.zeros((d, 96)), "tall": jnp.zeros((80, d))}
  tx = st.subtrack(rank, 5, subspace_update=mode)
  text = jax.jit(tx.update).lower(params, tx.init(params)).compile().as_text()
  sizes = constant_sizes(text)
  assert sizes, "no constant parsed: the pattern no longer reads the HLO"
  assert max(sizes) < (2 * rank) ** 2, sizes[-5:]


_EDGE = re.compile(r"(body|condition|to_apply|calls|branch_computations)="
                   r"(\{[^}]*\}|%[\w.\-]+)")


def while_depths(hlo_text: str) -> tuple:
  """Each computation's instructions, and how many while-loop bodies
  enclose it (the least over the paths from the entry computation)."""
  comps, cur, entry = {}, None, None
  for line in hlo_text.splitlines():
    m = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if m and not line.startswith(" "):
      cur = m.group(2)
      comps[cur] = []
      entry = cur if m.group(1) else entry
    elif cur is not None:
      comps[cur].append(line)
  depth, todo = {entry: 0}, [entry]
  while todo:
    c = todo.pop()
    for line in comps.get(c, []):
      for kind, names in _EDGE.findall(line):
        for n in re.findall(r"%?([\w.\-]+)", names):
          d = depth[c] + (kind == "body")
          if d < depth.get(n, 1 << 30):
            depth[n] = d
            todo.append(n)
  return comps, depth


def test_while_depths_reads_nesting():
  text = """HloModule m
%inner (p: s32[]) -> s32[] {
  ROOT %r = s32[] rsqrt(s32[] %p)
}
%outer (p: s32[]) -> s32[] {
  ROOT %w = s32[] while(s32[] %p), condition=%cond, body=%inner
}
ENTRY %main (p: s32[]) -> s32[] {
  ROOT %w = s32[] while(s32[] %p), condition=%cond, body=%outer
}"""
  _, depth = while_depths(text)
  assert depth == {"main": 0, "outer": 1, "inner": 2, "cond": 0}


@pytest.mark.parametrize("mode", ["grassmann", "svd", "frozen"])
def test_subspace_update_stays_inside_its_gate(mode):
  """The first basis's eigensolver (Jacobi; its rotations are the program's
  only rsqrt) sits four loops deep: the sweep over the matrices, the 0/1-trip
  subspace gate, Jacobi's sweeps, its rounds. Three would mean XLA hoisted
  it out of the gate as loop-invariant (a function of the gradient alone)
  and ran the SVD on every step (it did in ``svd`` mode before the gate's
  body read the gradient through a barrier: 18.7 s ordinary steps)."""
  params = {"a": jnp.zeros((16, 48)), "b": jnp.zeros((16, 48))}
  tx = st.subtrack(4, 5, subspace_update=mode)
  text = jax.jit(tx.update).lower(params, tx.init(params)).compile().as_text()
  comps, depth = while_depths(text)
  rsqrt = [depth[c] for c, lines in comps.items()
           if c in depth and any(" rsqrt(" in l for l in lines)]
  assert rsqrt and min(rsqrt) >= 4, rsqrt
