"""The loss as a ``torch.library`` custom op, so ``torch.compile(..., fullgraph=True)`` keeps it
in the graph (no graph break) on every backend.

Two ops, with these schemas (stable: a change gets a new overload name)::

    adaptive_cl::info_nce(Tensor z, Tensor z_aug, Tensor? k, float? k_value, Tensor? labels,
        float temperature, bool normalize, str denominator, str weighting,
        float positive_weight, str threshold, float threshold_scale, str reduction,
        str backend) -> (Tensor loss, Tensor row_stats)

    adaptive_cl::info_nce_backward(Tensor grad, Tensor z, Tensor z_aug, Tensor? k,
        float? k_value, Tensor? labels, Tensor row_stats, <the same options>, str backend)
        -> (Tensor dz, Tensor dz_aug, Tensor dk)

Arguments are those of :func:`adaptive_cl.adaptive_info_nce`, validated the same way, with the
threshold split in two: ``k`` a tensor (0-d, (B,) or (N,)) or ``k_value`` a float (not both).
``loss`` is what ``adaptive_info_nce`` returns. ``row_stats`` is an ``(S, N)`` tensor of per-row
statistics that the backend's backward consumes (float32 S = 3 for the Triton kernels, 4 with the soft threshold; S = 4 in
the compute dtype for the C++ extension, S = 0 for backends that recompute);
it is private to the backend: read only ``loss``. ``dk`` has ``k``'s shape, or shape (0,) when
``k`` is None. ``backend`` is a name of ``adaptive_cl.backends.BACKENDS``; "auto" resolves
inside the op by the same metadata-only rule as in eager mode.

``info_nce`` has a fake (meta) implementation and a registered autograd formula that calls
``info_nce_backward``, so torch.compile traces both directions without running a kernel. The
ops are opaque to Inductor: the fused kernel is already one launch per direction, so nothing
is lost by not fusing into it. (``triton_op``/``wrap_triton`` would let Inductor see the
launches, but they need the launch code in kernels/ wrapped, and they give no benefit here.)

How each backend runs inside the op:

- the Triton kernel (``backend="triton"``, or "auto" on CUDA): the forward returns its per-row
  statistics (m_i, the backward's two per-row factors and, with the soft threshold, the row term
  of dl_i/da_ij) as ``row_stats``; the backward reads them and recomputes only the O(N D) row
  preparation (a pre-pass), not the N^2 work. Labels and the soft threshold's dL/dk included.
- the C++ extension (``backend="cpu"``, or "auto" on CPU where it builds): its forward's (4, N)
  statistics go to its backward; nothing recomputed.
- every other backend (the reference, its ``torch.compile`` form, backends added later): the
  forward runs without autograd; the backward re-runs it under ``torch.func.vjp``. (Plain
  autograd cannot record inside an op implementation: the dispatcher has already stepped
  below the autograd keys.) So these pay one extra forward, and are differentiable once.

:func:`adaptive_cl.adaptive_info_nce` calls the op whenever it is being compiled; in eager mode
it calls the backend directly (the reference then keeps double-backward support). On a torch
without ``torch.library.custom_op`` (older than 2.4, below the supported range) nothing is
registered, ``AVAILABLE`` is False and the loss runs unregistered (torch.compile graph-breaks).
"""

from __future__ import annotations

import inspect

import torch

from . import backends
from .contract import LossOptions, Prepared, compute_dtype, make_options, prepare
from .reference import reduce

#: Whether this torch can register the ops (``torch.library.custom_op`` with an explicit
#: schema, torch >= 2.4).
AVAILABLE = (hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_autograd")
             and "schema" in inspect.signature(torch.library.custom_op).parameters)

_OPTIONS = ("float temperature, bool normalize, str denominator, str weighting, "
            "float positive_weight, str threshold, float threshold_scale, str reduction")
FORWARD_SCHEMA = (f"(Tensor z, Tensor z_aug, Tensor? k, float? k_value, Tensor? labels, {_OPTIONS}, "
                  "str backend) -> (Tensor, Tensor)")
BACKWARD_SCHEMA = (f"(Tensor grad, Tensor z, Tensor z_aug, Tensor? k, float? k_value, Tensor? labels, "
                   f"Tensor row_stats, {_OPTIONS}, str backend) -> (Tensor, Tensor, Tensor)")


def _options(temperature, normalize, denominator, weighting, positive_weight, threshold,
             threshold_scale, reduction) -> LossOptions:
    return make_options(temperature=temperature, normalize=normalize, denominator=denominator,
                        weighting=weighting, positive_weight=positive_weight, threshold=threshold,
                        threshold_scale=threshold_scale, reduction=reduction)


def _prepare(z, z_aug, k, k_value, labels, options) -> Prepared:
    if k is not None and k_value is not None:
        raise ValueError("give the threshold as k (a tensor) or k_value (a float), not both")
    return prepare(z, z_aug, k_value if k is None else k, labels, options)


def _loss_like(p: Prepared) -> torch.Tensor:
    n = 2 * p.batch
    shape = (n,) if p.options.reduction == "none" else ()
    return p.z.new_empty(shape, dtype=p.compute_dtype)


# ------------------------------------------------------------------------ per-backend adapters
class _Recompute:
    """Any backend ``Prepared -> loss`` that autograd can differentiate: forward without autograd,
    backward by ``torch.func.vjp`` of a second forward."""

    @staticmethod
    def stats_meta(p: Prepared) -> tuple[int, torch.dtype]:
        return 0, torch.float32

    @staticmethod
    def forward(fn, p: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            loss = fn(p)
        return loss, p.z.new_empty((0, 2 * p.batch), dtype=torch.float32)

    @staticmethod
    def backward(fn, z, z_aug, k, k_value, labels, options, row_stats, grad):
        def loss_of(z_, z_aug_, *k_):
            return fn(_prepare(z_, z_aug_, k_[0] if k_ else None, k_value, labels, options))

        primals = (z, z_aug) if k is None else (z, z_aug, k)
        _, vjp = torch.func.vjp(loss_of, *primals)
        grads = vjp(grad.to(compute_dtype(z.dtype)))
        # dz and dz_aug come back as two views of torch.cat's gradient; an op's outputs must not alias.
        dk = grads[2].clone() if k is not None else z.new_empty((0,))
        return grads[0].clone(), grads[1].clone(), dk


class _Triton:
    """The fused kernels through their tensor-only entry points (kernels/function.py
    ``forward_stats`` / ``backward_from_stats``): the forward's per-row statistics (3, N), or
    (4, N) with the soft threshold, travel as ``row_stats``; the backward recomputes the O(N D)
    row preparation, not the N^2 work. Every option: labels, the soft threshold and its dL/dk."""

    @staticmethod
    def stats_meta(p: Prepared) -> tuple[int, torch.dtype]:
        return (4 if p.options.threshold == "soft" else 3), torch.float32

    @staticmethod
    def forward(fn, p: Prepared):
        from .kernels import function as f

        k_rows = None if p.k_scalar is not None else p.k_rows
        with f._on_device(p.z):
            loss, stats = f.forward_stats(p.z, p.z_aug, k_rows, p.k_scalar, p.options, labels_rows=p.labels_rows)
        return reduce(loss, p.options.reduction), stats

    @staticmethod
    def backward(fn, z, z_aug, k, k_value, labels, options, row_stats, grad):
        from .kernels import function as f

        p = _prepare(z, z_aug, k, k_value, labels, options)
        k_rows = None if p.k_scalar is not None else p.k_rows
        soft_k = k is not None and options.threshold == "soft"
        with f._on_device(z):
            out = f.backward_from_stats(z, z_aug, k_rows, p.k_scalar, options, row_stats, grad,
                                        labels_rows=p.labels_rows, k_grad=soft_k)
        return out[0], out[1], _k_grad(k, z, out[2] if soft_k else None)


class _CPU:
    """The fused C++ extension (adaptive_cl/cpu): its forward returns (4, N) per-row statistics
    in the compute dtype, which its backward reads; nothing is recomputed. (Its autograd
    Function cannot run under torch.func, so the recompute adapter would not do.)"""

    @staticmethod
    def stats_meta(p: Prepared) -> tuple[int, torch.dtype]:
        return 4, p.compute_dtype

    @staticmethod
    def forward(fn, p: Prepared):
        from .cpu.build import extension
        from .cpu.function import _REDUCTION_CODE, _option_args, compute_inputs

        z, z_aug = compute_inputs(p.z, p.z_aug)
        return extension().forward(z, z_aug, p.k_rows, p.labels_rows, *_option_args(p.options),
                                   _REDUCTION_CODE[p.options.reduction])

    @staticmethod
    def backward(fn, z, z_aug, k, k_value, labels, options, row_stats, grad):
        from .cpu.build import extension
        from .cpu.function import _option_args, compute_inputs, upstream_rows

        p = _prepare(z, z_aug, k, k_value, labels, options)
        zc, zac = compute_inputs(z, z_aug)
        u = upstream_rows(grad, options.reduction, 2 * p.batch, zc.dtype)
        soft_k = k is not None and options.threshold == "soft"
        dz, dza, dk_rows = extension().backward(zc, zac, p.k_rows, p.labels_rows, row_stats, u,
                                                *_option_args(options), soft_k)
        return dz.to(z.dtype), dza.to(z_aug.dtype), _k_grad(k, z, dk_rows if soft_k else None)


def _k_grad(k: torch.Tensor | None, z: torch.Tensor, dk_rows: torch.Tensor | None) -> torch.Tensor:
    """The op's dk output: shape (0,) without a k tensor; the fused backward's (N,) row
    gradients folded to k's shape with the soft threshold; zeros with the hard one (flat)."""
    if k is None:
        return z.new_empty((0,))
    return torch.zeros_like(k) if dk_rows is None else _fold_rows(dk_rows, k)


def _fold_rows(dk_rows: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A gradient for the N row thresholds, in the shape the caller gave k: 0-d (every row
    shares it), (B,) (rows i and i + B share k[i]) or (N,)."""
    b = dk_rows.shape[0] // 2
    if k.dim() == 0:
        folded = dk_rows.sum()
    elif k.shape[0] == b:
        folded = dk_rows[:b] + dk_rows[b:]
    else:
        folded = dk_rows.clone()
    return folded.to(k.dtype)


def _adapter(fn):
    """The op adapter of a resolved backend function: split forward/backward for the fused
    backends, recompute-by-vjp for everything else."""
    from . import cpu

    if fn is cpu.adaptive_info_nce_cpu:
        return _CPU
    try:
        from .kernels import adaptive_info_nce_triton
    except ImportError:
        return _Recompute
    return _Triton if fn is adaptive_info_nce_triton else _Recompute


# --------------------------------------------------------------------------------- registration
if AVAILABLE:

    @torch.library.custom_op("adaptive_cl::info_nce", mutates_args=(), schema=FORWARD_SCHEMA)
    def info_nce_op(z, z_aug, k, k_value, labels, temperature, normalize, denominator, weighting,
                    positive_weight, threshold, threshold_scale, reduction, backend):
        options = _options(temperature, normalize, denominator, weighting, positive_weight,
                           threshold, threshold_scale, reduction)
        p = _prepare(z, z_aug, k, k_value, labels, options)
        fn = backends.resolve(backend, p)
        return _adapter(fn).forward(fn, p)

    @info_nce_op.register_fake
    def _info_nce_fake(z, z_aug, k, k_value, labels, temperature, normalize, denominator, weighting,
                       positive_weight, threshold, threshold_scale, reduction, backend):
        options = _options(temperature, normalize, denominator, weighting, positive_weight,
                           threshold, threshold_scale, reduction)
        p = _prepare(z, z_aug, k, k_value, labels, options)
        rows, dtype = _adapter(backends.resolve(backend, p)).stats_meta(p)
        return _loss_like(p), z.new_empty((rows, 2 * p.batch), dtype=dtype)

    @torch.library.custom_op("adaptive_cl::info_nce_backward", mutates_args=(), schema=BACKWARD_SCHEMA)
    def info_nce_backward_op(grad, z, z_aug, k, k_value, labels, row_stats, temperature, normalize,
                             denominator, weighting, positive_weight, threshold, threshold_scale,
                             reduction, backend):
        options = _options(temperature, normalize, denominator, weighting, positive_weight,
                           threshold, threshold_scale, reduction)
        p = _prepare(z, z_aug, k, k_value, labels, options)
        fn = backends.resolve(backend, p)
        out = _adapter(fn).backward(fn, z, z_aug, k, k_value, labels, options, row_stats, grad)
        # contiguous whatever the inputs' strides, as the fake below says (issue 23: a
        # transposed z's fake gradient kept its strides while the kernels' is contiguous)
        return tuple(t.contiguous() for t in out)

    @info_nce_backward_op.register_fake
    def _info_nce_backward_fake(grad, z, z_aug, k, k_value, labels, row_stats, *rest):
        dk = z.new_empty((0,)) if k is None else k.new_empty(k.shape)
        return z.new_empty(z.shape), z_aug.new_empty(z_aug.shape), dk

    def _setup_context(ctx, inputs, output):
        z, z_aug, k, k_value, labels = inputs[:5]
        ctx.save_for_backward(z, z_aug, k, labels, output[1])
        ctx.k_value = k_value
        ctx.rest = inputs[5:]  # the options and the backend name

    def _backward(ctx, grad, _grad_row_stats):
        z, z_aug, k, labels, row_stats = ctx.saved_tensors
        dz, dza, dk = info_nce_backward_op(grad, z, z_aug, k, ctx.k_value, labels, row_stats, *ctx.rest)
        return (dz, dza, dk if k is not None else None) + (None,) * 11

    info_nce_op.register_autograd(_backward, setup_context=_setup_context)


def info_nce(p: Prepared, backend: str) -> torch.Tensor:
    """The reduced loss of prepared inputs through the registered op (what
    ``adaptive_info_nce`` calls under torch.compile)."""
    o = p.options
    k = None if p.k_rows is None or p.k_scalar is not None else p.k_rows
    loss, _ = torch.ops.adaptive_cl.info_nce(
        p.z, p.z_aug, k, p.k_scalar, p.labels_rows, o.temperature, o.normalize, o.denominator,
        o.weighting, o.positive_weight, o.threshold, o.threshold_scale, o.reduction, backend)
    return loss
