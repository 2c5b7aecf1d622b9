"""`attention`: validates a call once, then picks the implementation by the platform
being lowered for.

Implementations (see `IMPLEMENTATIONS`):
  "xla"            `reference_attention`, pure jnp; runs everywhere.
  "pallas"         our flash-attention kernel: Mosaic TPU (`kernels.tpu`) when lowering for TPU,
                   Mosaic GPU (`kernels.gpu_mosaic`, Hopper sm90+, jax >= 0.12) when lowering for
                   CUDA, Pallas interpret mode of the TPU kernel anywhere else (CPU tests). On CUDA a
                   call the Mosaic GPU kernel does not serve (a pre-Hopper GPU, float32, a head dim
                   outside 64..256, jax < 0.12) raises: it never falls back to the Triton kernel.
  "pallas_triton"  the Pallas Triton-backend kernel (`kernels.gpu_triton`) for pre-Hopper GPUs, while
                   the installed JAX still has the (deprecated) Triton backend; on CPU it runs in
                   Pallas interpret mode; it does not lower for TPU.
  "cudnn"          jax.nn.dot_product_attention(implementation="cudnn"); CUDA only.
  None             "pallas" when lowering for TPU or CUDA, "xla" elsewhere ("xla"
                   everywhere when a bias is given, which the kernels do not take).

The choice follows the platform being lowered for (`jax.lax.platform_dependent`),
not the host, so an AOT compile for TPU from a CPU host contains the Mosaic
kernel. An implementation that cannot serve a call raises; nothing falls back.
Under a mesh the kernels run inside `shard_map` (`kernels.sharding`).

Letter legend: B batch, T q length, S kv length, N q heads, K kv heads, H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir

from kernels import base, gpu_mosaic, reference, sharding, tpu

try:  # the Pallas Triton backend is deprecated (jax 0.11) and will leave jax
    from kernels import gpu_triton
except ImportError:  # pragma: no cover - a jax without jax.experimental.pallas.triton
    gpu_triton = None

IMPLEMENTATIONS = ("xla", "pallas", "pallas_triton", "cudnn")
CONTEXT_PARALLEL = ("allgather", "ring")  # kernels.context


def attention(q, k, v, *, causal=False, segment_ids=None, scale=None,
              sliding_window=None, logits_soft_cap=None, bias=None, sinks=None,
              implementation=None, mesh=None, context_parallel=None):
    """Multi-head attention with GQA/MQA, packing, causal/sliding-window masks.

    Args:
      q: [B, T, N, H]; k: [B, S, K, H], v: [B, S, K, Hv] with K dividing N (Hv may differ from H:
        multi-head latent attention; the kernels get q/k/v zero-padded to one head dim, exactly).
      causal: mask future keys; with T != S the last query aligns with the last key.
      segment_ids: int [B, T] (T == S) or a (q_ids [B, T], kv_ids [B, S]) pair;
        id 0 is padding. Rows with nothing to attend to give zeros.
      scale: logit scale, default 1/sqrt(H).
      sliding_window: W; query i sees keys j with i - W < j <= i.
      logits_soft_cap: c; scaled logits x become c * tanh(x / c).
      bias: additive logits bias broadcastable to [B, N, T, S] ("xla" only).
      sinks: float [N]: a learned logit per query head that joins every row's softmax with no
        value (takes probability mass only; GPT-OSS). Differentiable; every implementation
        but "cudnn" takes it.
      implementation: None, "xla", "pallas", "pallas_triton" or "cudnn" (see the module docstring).
      mesh: the mesh to shard the kernel over; default the mesh in context
        (`jax.sharding.get_abstract_mesh()`), if any.
      context_parallel: None, "allgather" or "ring" (`kernels.context`). When the logical rules
        shard "length" over mesh axes of more than one device, the rows of q, k, v and segment ids
        must be in the zig-zag order of `kernels.context.zigzag_order`, and attention runs per
        length shard: "allgather" gathers k and v, "ring" passes k/v blocks around the ring and
        merges them by their log-sum-exp. Needs T == S and no bias. None: the length is gathered
        whole on every shard (natural order), as without a length rule.

    Returns:
      [B, T, N, Hv] in q's dtype.
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; expected None or one "
                         f"of {IMPLEMENTATIONS}")
    q_ids, kv_ids, options = base.validate(
        q, k, v, causal=causal, segment_ids=segment_ids, scale=scale,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, bias=bias)
    sinks = base.validate_sinks(sinks, q.shape[2])
    if context_parallel is not None and context_parallel not in CONTEXT_PARALLEL:
        raise ValueError(f"unknown context_parallel {context_parallel!r}; expected None or one of {CONTEXT_PARALLEL}")
    if context_parallel is not None and sharding.context_axes(mesh) is not None:
        if bias is not None:
            raise NotImplementedError("context parallelism takes no additive bias")
    else:
        context_parallel = None
    if (implementation == "xla" and context_parallel is None) or (implementation is None and bias is not None):
        return reference.attend(q, k, v, q_ids, kv_ids, options, bias, sinks)
    if bias is not None:
        raise NotImplementedError(
            f"implementation={implementation!r} does not take an additive bias; "
            "use implementation='xla' (or None) for biased attention")
    h, hv = q.shape[3], v.shape[3]
    if hv != h:  # the kernels take one head dim: zero columns change no logit and add zero output columns
        width = max(h, hv)
        pad = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, width - x.shape[3]),))
        out = attention(pad(q), pad(k), pad(v), causal=causal, segment_ids=segment_ids, scale=options.scale,
                        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, sinks=sinks,
                        implementation=implementation, mesh=mesh, context_parallel=context_parallel)
        return out[..., :hv]
    if context_parallel is not None:
        if implementation in ("cudnn", "pallas_triton"):
            raise NotImplementedError(f"context parallelism runs with implementation 'pallas' or 'xla', not "
                                      f"{implementation!r}")
        kernel = (functools.partial(_xla_kernel, options=options) if implementation == "xla" else
                  functools.partial(_kernel_for_platform, implementation, options=options))
        return sharding.sharded(kernel, q, k, v, q_ids, kv_ids, mesh, sinks=sinks, options=options,
                                context_parallel=context_parallel,
                                lse_kernel=functools.partial(_lse_for_platform, implementation))
    if implementation == "cudnn":
        _check_cudnn(q, k, q_ids, options, sinks)
        kernel = functools.partial(_cudnn_for_platform, options=options)
    else:
        kernel = functools.partial(_kernel_for_platform, implementation, options=options)
    return sharding.sharded(kernel, q, k, v, q_ids, kv_ids, mesh, sinks=sinks)


def _kernel_for_platform(implementation, q, k, v, q_ids, kv_ids, sinks=None, *, options):
    """The Pallas kernel (or, for implementation=None off TPU/CUDA, the reference)."""

    def branch(fn, what, **kwargs):
        # platform_dependent traces every branch; a kernel that rejects this call
        # (e.g. the GPU kernel's head_dim limit) must only fail if it is lowered.
        def traced():
            try:
                return fn(q, k, v, q_ids, kv_ids, options, sinks=sinks, **kwargs)
            except (ValueError, NotImplementedError) as e:
                return _fail_at_lowering(q, f"{what} cannot serve this call: {e}")
        return traced

    if implementation == "pallas_triton":
        what = "the Pallas Triton GPU kernel (kernels/gpu_triton.py)"
        triton = branch(_triton, what)
        return jax.lax.platform_dependent(
            cuda=triton, tpu=branch(_unavailable, what, message="it only lowers for CUDA GPUs"),
            default=branch(_triton, what + " in interpret mode", interpret=True))
    mosaic = branch(tpu.flash_attention, "the Pallas TPU kernel", interpret=False)
    if implementation == "pallas":
        default = branch(tpu.flash_attention, "the Pallas kernel in interpret mode", interpret=True)
    else:
        default = branch(_reference, "the reference")
    cuda = branch(_mosaic_gpu, "the Mosaic GPU kernel (kernels/gpu_mosaic.py)")
    return jax.lax.platform_dependent(tpu=mosaic, cuda=cuda, default=default)


def _lse_for_platform(implementation, q, k, v, q_ids, kv_ids, options):
    """(out [B, T, N, H] in q's dtype, lse [B, T, N] float32): attention and the natural
    log-sum-exp of each row's kept, scaled (soft-capped) logits; a row with no key to attend to
    gives out 0 and lse `base.MASK_VALUE`. Differentiable in q, k, v through both outputs. No
    sinks, bias or mesh: `kernels.context` calls it per shard, inside shard_map, and merges
    calls on disjoint key blocks by their lse.

    implementation: None, "xla" or "pallas". The Mosaic TPU kernel when lowering for TPU (but
    for "xla"); on CUDA it raises when lowered; elsewhere the TPU kernel in interpret mode for
    "pallas" and the reference for None and "xla".
    """

    def fail(message):  # both outputs, shaped as they would be, raising if lowered
        return _fail_at_lowering(q, message), _fail_at_lowering(q[..., 0].astype(jnp.float32), message)

    def branch(fn, what, **kwargs):
        def traced():  # platform_dependent traces every branch: fail only if this one is lowered
            try:
                return fn(q, k, v, q_ids, kv_ids, options, **kwargs)
            except (ValueError, NotImplementedError) as e:
                return fail(f"{what} cannot serve this call: {e}")
        return traced

    reference_branch = branch(reference.attend_with_lse, "the reference")
    if implementation == "xla":
        return reference_branch()
    mosaic = branch(tpu.flash_attention_with_lse, "the Pallas TPU kernel", interpret=False)
    if implementation == "pallas":
        default = branch(tpu.flash_attention_with_lse, "the Pallas kernel in interpret mode", interpret=True)
    else:
        default = reference_branch
    cuda = lambda: fail("context parallelism on GPUs is not implemented yet")
    return jax.lax.platform_dependent(tpu=mosaic, cuda=cuda, default=default)


def _xla_kernel(q, k, v, q_ids, kv_ids, sinks=None, *, options):
    return reference.attend(q, k, v, q_ids, kv_ids, options, None, sinks)


def _reference(q, k, v, q_ids, kv_ids, options, sinks=None):
    return reference.attend(q, k, v, q_ids, kv_ids, options, None, sinks)


def _mosaic_gpu(q, k, v, q_ids, kv_ids, options, sinks=None):
    gpu_mosaic.check_device()
    return gpu_mosaic.flash_attention(q, k, v, q_ids, kv_ids, options, sinks=sinks)


def _triton(q, k, v, q_ids, kv_ids, options, sinks=None, interpret=False):
    if gpu_triton is None:
        raise NotImplementedError(f"the installed jax ({jax.__version__}) has no Pallas Triton backend; "
                                  "use implementation='pallas' (Hopper+) or 'xla'")
    return gpu_triton.flash_attention(q, k, v, q_ids, kv_ids, options, interpret=interpret, sinks=sinks)


def _unavailable(q, k, v, q_ids, kv_ids, options, message, sinks=None):
    raise NotImplementedError(message)


def _check_cudnn(q, k, q_ids, options, sinks=None):
    """Raise for what jax.nn.dot_product_attention's cuDNN path cannot express."""
    if sinks is not None:
        raise NotImplementedError("implementation='cudnn' has no attention sinks; use 'pallas' or 'xla'")
    if options.logits_soft_cap is not None:
        raise NotImplementedError("implementation='cudnn' has no logits soft cap; use 'pallas'")
    if q_ids is not None:
        raise NotImplementedError(
            "implementation='cudnn' cannot express packed segment ids; use 'pallas'")
    if options.causal and q.shape[1] != k.shape[1]:
        raise NotImplementedError(
            "implementation='cudnn' aligns causal masks top-left; q_len != kv_len "
            "with causal=True needs 'pallas' or 'xla'")


def _cudnn_for_platform(q, k, v, q_ids, kv_ids, sinks=None, *, options):
    del q_ids, kv_ids, sinks  # rejected by _check_cudnn
    window = options.sliding_window

    def cudnn():
        try:
            return jax.nn.dot_product_attention(
                q, k, v, scale=options.scale, is_causal=options.causal or window is not None,
                local_window_size=None if window is None else (window - 1, 0),
                implementation="cudnn")
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
