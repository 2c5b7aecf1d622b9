"""Attention kernels: one entry point, `attention`, dispatching by lowering platform.

Implementations (typed names, see `IMPLEMENTATIONS`):
  "xla"     `reference_attention`, pure jnp; runs everywhere.
  "pallas"  our flash-attention kernel: Mosaic when lowering for TPU, the Triton
            kernel of `kernels.flash_attention_gpu` when lowering for CUDA, Pallas
            interpret mode anywhere else (CPU tests).
  "cudnn"   jax.nn.dot_product_attention(implementation="cudnn"); CUDA only.
  None      "pallas" when lowering for TPU or CUDA, "xla" elsewhere ("xla"
            everywhere when a bias is given, which the kernels do not take).

The choice follows the platform being lowered for (`jax.lax.platform_dependent`),
not the host, so an AOT compile for TPU from a CPU host contains the Mosaic
kernel. An implementation that cannot serve a call raises; nothing falls back.

Under a mesh, the Pallas kernels (which XLA cannot partition) run inside
`shard_map`, split over batch and heads as the Flax logical-axis rules in context
say ("batch", "heads", "kv_heads"); sequence and head_dim stay whole.

Letter legend: B batch, T q length, S kv length, N q heads, K kv heads, H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.extend.core import Primitive
from jax.interpreters import mlir
from jax.sharding import PartitionSpec

from kernels import flash_attention as _flash_tpu
from kernels.reference import reference_attention, split_segment_ids

try:  # The Triton kernel is optional until it is written; used only for CUDA.
  from kernels.flash_attention_gpu import flash_attention_gpu as _flash_gpu
  _GPU_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the checkout
  _flash_gpu = None
  _GPU_IMPORT_ERROR = e

__all__ = ["attention", "reference_attention", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("xla", "pallas", "cudnn")


def attention(q, k, v, *, causal=False, segment_ids=None, scale=None,
              sliding_window=None, logits_soft_cap=None, bias=None,
              implementation=None, mesh=None):
  """Multi-head attention with GQA/MQA, packing, causal/sliding-window masks.

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H] with K dividing N.
    causal: mask future keys; with T != S the last query aligns with the last key.
    segment_ids: int [B, T] (T == S) or a (q_ids [B, T], kv_ids [B, S]) pair;
      id 0 is padding. Rows with nothing to attend to give zeros.
    scale: logit scale, default 1/sqrt(H).
    sliding_window: W; query i sees keys j with i - W < j <= i.
    logits_soft_cap: c; scaled logits x become c * tanh(x / c).
    bias: additive logits bias broadcastable to [B, N, T, S] ("xla" only).
    implementation: None, "xla", "pallas" or "cudnn" (see the module docstring).
    mesh: the mesh to shard the kernel over; default the mesh in context
      (`jax.sharding.get_abstract_mesh()`), if any.

  Returns:
    [B, T, N, H] in q's dtype.
  """
  _validate(q, k, v, segment_ids, sliding_window, logits_soft_cap, bias, implementation)
  q_ids, kv_ids = split_segment_ids(segment_ids, q.shape[0], q.shape[1], k.shape[1])
  options = dict(causal=bool(causal), scale=scale, sliding_window=sliding_window,
                 logits_soft_cap=logits_soft_cap)
  if implementation == "xla" or (implementation is None and bias is not None):
    return reference_attention(q, k, v, segment_ids=_pair(q_ids, kv_ids), bias=bias, **options)
  if bias is not None:
    raise NotImplementedError(
        f"implementation={implementation!r} does not take an additive bias; "
        "use implementation='xla' (or None) for biased attention")
  if implementation == "cudnn":
    _check_cudnn(q, k, q_ids, logits_soft_cap, causal)
    kernel = functools.partial(_cudnn_for_platform, **options)
  else:
    kernel = functools.partial(_kernel_for_platform, implementation, **options)
  return _sharded(kernel, q, k, v, q_ids, kv_ids, mesh)


def _pair(q_ids, kv_ids):
  return None if q_ids is None else (q_ids, kv_ids)


def _validate(q, k, v, segment_ids, sliding_window, logits_soft_cap, bias, implementation):
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation {implementation!r}; expected None or one "
                     f"of {IMPLEMENTATIONS}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError("q, k, v must be [batch, len, heads, head_dim]; got shapes "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"batch sizes differ: q {q.shape[0]}, k/v {k.shape[0]}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"head_dim differs: q {q.shape[3]}, k/v {k.shape[3]}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"kv heads ({k.shape[2]}) must divide heads ({q.shape[2]})")
  for x in (q, k, v):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"q, k, v must be floating point, got {x.dtype}")
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
  if sliding_window is not None and int(sliding_window) < 1:
    raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
  if logits_soft_cap is not None and float(logits_soft_cap) <= 0:
    raise ValueError(f"logits_soft_cap must be > 0, got {logits_soft_cap}")
  if bias is not None:
    target = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    try:
      jnp.broadcast_shapes(bias.shape, target)
    except ValueError:
      raise ValueError(f"bias shape {bias.shape} does not broadcast to [B, N, T, S] = "
                       f"{target}") from None
  split_segment_ids(segment_ids, q.shape[0], q.shape[1], k.shape[1])


# ----------------------------------------------------------------------------
# Per-platform kernels.


def _kernel_for_platform(implementation, q, k, v, q_ids, kv_ids, **options):
  """The Pallas kernel (or, for implementation=None off TPU/CUDA, the reference)."""
  segment_ids = _pair(q_ids, kv_ids)

  def branch(fn, what):
    # platform_dependent traces every branch; a kernel that rejects this call
    # (e.g. the GPU kernel's head_dim limit) must only fail if it is lowered.
    def traced():
      try:
        return fn(q, k, v, segment_ids=segment_ids, **options)
      except (ValueError, NotImplementedError) as e:
        return _fail_at_lowering(q, f"{what} cannot serve this call: {e}")
    return traced

  mosaic = branch(functools.partial(_flash_tpu.flash_attention, interpret=False),
                  "the Pallas TPU kernel")
  if implementation == "pallas":
    default = branch(functools.partial(_flash_tpu.flash_attention, interpret=True),
                     "the Pallas kernel in interpret mode")
  else:
    default = branch(reference_attention, "the reference")
  if _flash_gpu is not None:
    cuda = branch(_flash_gpu, "the Pallas GPU kernel (kernels/flash_attention_gpu.py)")
  else:
    cuda = lambda: _fail_at_lowering(
        q, "implementation='pallas' needs kernels/flash_attention_gpu.py to lower for "
        f"CUDA, and importing it failed: {_GPU_IMPORT_ERROR!r}")
  return jax.lax.platform_dependent(tpu=mosaic, cuda=cuda, default=default)


def _check_cudnn(q, k, q_ids, logits_soft_cap, causal):
  """Raise for what jax.nn.dot_product_attention's cuDNN path cannot express."""
  if logits_soft_cap is not None:
    raise NotImplementedError("implementation='cudnn' has no logits soft cap; use 'pallas'")
  if q_ids is not None:
    raise NotImplementedError(
        "implementation='cudnn' cannot express packed segment ids; use 'pallas'")
  if causal and q.shape[1] != k.shape[1]:
    raise NotImplementedError(
        "implementation='cudnn' aligns causal masks top-left; q_len != kv_len "
        "with causal=True needs 'pallas' or 'xla'")


def _cudnn_for_platform(q, k, v, q_ids, kv_ids, *, causal, scale, sliding_window,
                        logits_soft_cap):
  del q_ids, kv_ids, logits_soft_cap  # rejected by _check_cudnn

  def cudnn():
    window = None if sliding_window is None else (int(sliding_window) - 1, 0)
    try:
      return jax.nn.dot_product_attention(
          q, k, v, scale=scale, is_causal=causal or sliding_window is not None,
          local_window_size=window, implementation="cudnn")
    except RuntimeError as e:  # e.g. "cuDNN is not detected" on a host without CUDA
      raise NotImplementedError(
          f"implementation='cudnn' is unavailable in this installation: {e}") from e

  return jax.lax.platform_dependent(
      cuda=cudnn,
      default=lambda: _fail_at_lowering(
          q, "implementation='cudnn' only lowers for CUDA GPUs; use 'pallas' or 'xla'"))


# A primitive that traces like identity and raises when lowered: it lets a
# platform_dependent branch that cannot be served fail only if it is the branch
# actually lowered (tracing builds every branch).
_fail_p = Primitive("attention_unavailable")
_fail_p.def_abstract_eval(lambda x, *, message: x)


def _fail_lowering(ctx, x, *, message):
  raise NotImplementedError(message)


mlir.register_lowering(_fail_p, _fail_lowering)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fail_at_lowering(x, message):
  return _fail_p.bind(x, message=message)


_fail_at_lowering.defvjp(
    lambda x, message: (_fail_p.bind(x, message=message), None),
    lambda message, _, ct: (_fail_p.bind(ct, message=message),))


# ----------------------------------------------------------------------------
# Sharding.


def _mesh_axes(entry, mesh):
  """Mesh axes of one PartitionSpec entry that exist in `mesh` and are not
  already manual (inside a caller's shard_map), or None."""
  names = (entry,) if isinstance(entry, str) else tuple(entry or ())
  manual = set(getattr(mesh, "manual_axes", ()))
  kept = tuple(n for n in names if n in mesh.axis_names and n not in manual)
  return kept or None


def _axis_size(axes, mesh):
  size = 1
  for name in axes or ():
    size *= mesh.shape[name]
  return size


def _sharded(kernel, q, k, v, q_ids, kv_ids, mesh):
  """Calls kernel(q, k, v, q_ids, kv_ids) per shard when a mesh and rules are active."""
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return kernel(q, k, v, q_ids, kv_ids)
  # Sequence and head_dim stay whole inside the kernel, whatever the rules say.
  q_spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim"))
  kv_spec = nn.logical_to_mesh_axes(("batch", "length", "kv_heads", "head_dim"))
  batch_axes = _mesh_axes(q_spec[0], mesh)
  head_axes = _mesh_axes(q_spec[2], mesh)
  kv_head_axes = _mesh_axes(kv_spec[2], mesh)
  if batch_axes is None and head_axes is None:
    return kernel(q, k, v, q_ids, kv_ids)
  B, _, N, _ = q.shape
  K = k.shape[2]
  dp, tp = _axis_size(batch_axes, mesh), _axis_size(head_axes, mesh)
  if B % dp or N % tp:
    raise ValueError(f"attention under mesh {dict(mesh.shape)}: batch {B} must divide by "
                     f"{batch_axes} ({dp}) and heads {N} by {head_axes} ({tp})")
  if kv_head_axes != head_axes:
    raise ValueError(f"logical rules shard 'heads' over {head_axes} but 'kv_heads' over "
                     f"{kv_head_axes}; attention needs them on the same mesh axes")
  if K % tp:
    if tp % K:
      raise ValueError(f"{K} kv heads cannot be split over {head_axes} ({tp}) devices")
    # Each shard's query heads read one kv head: repeat kv heads up to tp
    # (a small copy) so every shard holds exactly the kv head it needs.
    k, v = (jnp.repeat(x, tp // K, axis=2) for x in (k, v))
  qkv_spec = PartitionSpec(batch_axes, None, head_axes, None)
  ids_spec = PartitionSpec(batch_axes, None)
  if q_ids is None:
    body = lambda q, k, v: kernel(q, k, v, None, None)
    args, in_specs = (q, k, v), (qkv_spec,) * 3
  else:
    body = kernel
    args, in_specs = (q, k, v, q_ids, kv_ids), (qkv_spec,) * 3 + (ids_spec,) * 2
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=qkv_spec,
                       check_vma=False)(*args)
