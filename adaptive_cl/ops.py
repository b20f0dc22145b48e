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

A third op, ``adaptive_cl::info_nce_setup`` (with ``info_nce_setup_backward``), carries the
setups of issue 24 (a tensor temperature, a queue, log_q, a mask, the layout, symmetric,
same_label; schemas ``SETUP_FORWARD_SCHEMA`` / ``SETUP_BACKWARD_SCHEMA``); its backward also
returns dL/dtau. The C++ extension runs inside it with its (7, N) row statistics
(``_SetupCPU``), every other backend through the recompute adapter; the Triton kernels refuse
the setups (``backends.resolve``).

:func:`adaptive_cl.adaptive_info_nce` calls the op whenever it is being compiled; in eager mode
it calls the backend directly (the reference then keeps double-backward support). On a torch
without ``torch.library.custom_op`` (older than 2.4, below the supported range) nothing is
registered, ``AVAILABLE`` is False and the loss runs unregistered (torch.compile graph-breaks).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

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
    """The fused C++ extension (adaptive_cl/cpu): its forward returns per-row statistics in the
    compute dtype, which its backward reads; nothing is recomputed. (Its autograd Function cannot
    run under torch.func, so the recompute adapter would not do.) The op carries the first
    ``OP_STATS_ROWS`` = 4 (the loss's; the other rows serve dL/dtau, which the op does not
    take), so the op's outputs keep their shape across releases: a compiled graph cached by an
    earlier release still matches."""

    OP_STATS_ROWS = 4

    @staticmethod
    def stats_meta(p: Prepared) -> tuple[int, torch.dtype]:
        return _CPU.OP_STATS_ROWS, p.compute_dtype

    @staticmethod
    def forward(fn, p: Prepared):
        from .cpu.build import extension
        from .cpu.function import _REDUCTION_CODE, _option_args, compute_inputs

        z, z_aug = compute_inputs(p.z, p.z_aug)
        loss, stats = extension().forward(z, z_aug, p.k_rows, p.labels_rows, *_option_args(p.options),
                                          _REDUCTION_CODE[p.options.reduction])
        return loss, stats[:_CPU.OP_STATS_ROWS].contiguous()

    @staticmethod
    def backward(fn, z, z_aug, k, k_value, labels, options, row_stats, grad):
        from .cpu.build import extension
        from .cpu.function import _option_args, compute_inputs, upstream_rows

        p = _prepare(z, z_aug, k, k_value, labels, options)
        zc, zac = compute_inputs(z, z_aug)
        u = upstream_rows(grad, options.reduction, 2 * p.batch, zc.dtype)
        soft_k = k is not None and options.threshold == "soft"
        from .cpu.function import STATS_ROWS

        # the rows dL/dtau would read are not read without it: zeros
        row_stats = torch.cat([row_stats, row_stats.new_zeros(STATS_ROWS - row_stats.shape[0], row_stats.shape[1])])
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


# ------------------------------------------------------------------ the issue-24 setups' op
#: ``adaptive_cl::info_nce_setup``: the loss with the setups of issue 24 (a tensor temperature
#: ``tau``, the queue ``negatives``, ``log_q``, ``mask``, and ``layout``, ``symmetric``,
#: ``same_label``); ``temperature`` is ignored when ``tau`` is given. Its backward returns
#: (dz, dz_aug, dk, dtau), dk and dtau of shape (0,) when k or tau is None.
SETUP_FORWARD_SCHEMA = (f"(Tensor z, Tensor z_aug, Tensor? k, float? k_value, Tensor? labels, Tensor? tau, "
                        f"Tensor? negatives, Tensor? log_q, Tensor? mask, {_OPTIONS}, str layout, bool symmetric, "
                        "str same_label, str backend) -> (Tensor, Tensor)")
SETUP_BACKWARD_SCHEMA = (f"(Tensor grad, Tensor z, Tensor z_aug, Tensor? k, float? k_value, Tensor? labels, "
                         f"Tensor? tau, Tensor? negatives, Tensor? log_q, Tensor? mask, Tensor row_stats, {_OPTIONS}, "
                         "str layout, bool symmetric, str same_label, str backend) -> (Tensor, Tensor, Tensor, Tensor)")


@dataclass(frozen=True)
class _SetupArgs:
    """The setup op's non-differentiable arguments, in schema order after z, z_aug, k."""

    k_value: float | None
    labels: torch.Tensor | None
    negatives: torch.Tensor | None
    log_q: torch.Tensor | None
    mask: torch.Tensor | None
    options: tuple  # temperature .. reduction, layout, symmetric, same_label

    def prepare(self, z, z_aug, k, tau) -> Prepared:
        (temperature, normalize, denominator, weighting, positive_weight, threshold, threshold_scale, reduction,
         layout, symmetric, same_label) = self.options
        options = make_options(temperature=tau if tau is not None else temperature, normalize=normalize,
                               denominator=denominator, weighting=weighting, positive_weight=positive_weight,
                               threshold=threshold, threshold_scale=threshold_scale, reduction=reduction,
                               layout=layout, symmetric=symmetric, same_label=same_label)
        if k is not None and self.k_value is not None:
            raise ValueError("give the threshold as k (a tensor) or k_value (a float), not both")
        return prepare(z, z_aug, self.k_value if k is None else k, self.labels, options, temperature=tau,
                       negatives=self.negatives, log_q=self.log_q, mask=self.mask)


class _SetupRecompute:
    """Any backend that autograd can differentiate: the forward without autograd, the backward
    by ``torch.func.vjp`` of a second forward (as ``_Recompute``), dL/dtau included."""

    @staticmethod
    def stats_meta(p: Prepared) -> tuple[int, torch.dtype]:
        return 0, torch.float32

    @staticmethod
    def forward(fn, p: Prepared):
        with torch.no_grad():
            loss = fn(p)
        return loss, p.z.new_empty((0, 2 * p.batch), dtype=torch.float32)

    @staticmethod
    def backward(fn, args: _SetupArgs, z, z_aug, k, tau, row_stats, grad):
        def loss_of(z_, z_aug_, *rest):
            rest = list(rest)
            k_ = rest.pop(0) if k is not None else None
            tau_ = rest.pop(0) if tau is not None else None
            return fn(args.prepare(z_, z_aug_, k_, tau_))

        primals = (z, z_aug) + ((k,) if k is not None else ()) + ((tau,) if tau is not None else ())
        _, vjp = torch.func.vjp(loss_of, *primals)
        grads = list(vjp(grad.to(compute_dtype(z.dtype))))
        dz, dza = grads.pop(0).clone(), grads.pop(0).clone()  # views of torch.cat's gradient: no aliasing
        dk = grads.pop(0).clone() if k is not None else z.new_empty((0,))
        dtau = grads.pop(0).clone() if tau is not None else z.new_empty((0,))
        return dz, dza, dk, dtau


class _SetupCPU:
    """The C++ extension's ``forward_setup`` / ``backward_setup``: the forward's (7, N) per-row
    statistics travel as ``row_stats``; a mask selects the valid pairs in both passes (the
    statistics of masked rows stay zero), fewer than two of them take the recompute adapter
    with the reference, as ``adaptive_info_nce_cpu`` does."""

    @staticmethod
    def stats_meta(p: Prepared) -> tuple[int, torch.dtype]:
        from .cpu.function import STATS_ROWS

        return STATS_ROWS, p.compute_dtype

    @staticmethod
    def _problem(p: Prepared):
        """(the problem the extension computes, the pairs' indices, their rows among p's rows),
        the last two None without a mask; None when the mask leaves fewer than two pairs."""
        if p.mask is None:
            return p, None, None
        from .cpu import valid_pairs

        return valid_pairs(p)

    @staticmethod
    def forward(fn, p: Prepared):
        from .cpu import extension_inputs
        from .cpu.build import extension
        from .cpu.function import _REDUCTION_CODE, STATS_ROWS, _option_args

        o = p.options
        found = _SetupCPU._problem(p)
        if found is None:
            from .reference import adaptive_info_nce_reference

            loss = _SetupRecompute.forward(adaptive_info_nce_reference, p)[0]
            return loss, p.z.new_zeros((STATS_ROWS, 2 * p.batch), dtype=p.compute_dtype)
        sub, idx, per_row = found
        z, z_aug, k_rows, labels, setup, tau = extension_inputs(sub, tau_grad=sub.temperature is not None)
        tau_value = None if tau is None else float(tau)  # a CPU tensor
        loss, rows = extension().forward_setup(z, z_aug, k_rows, labels, *setup.args(),
                                               *_option_args(o, tau_value), _REDUCTION_CODE[o.reduction], 0, 0.0, 1.0)
        if setup.layout == 2 and o.reduction == "sum":
            loss = loss / 2  # the mean of the two directions' sums
        if idx is None:
            return loss, rows
        if o.reduction == "none":
            loss = loss.new_zeros(p.rows).index_put((per_row,), loss)
        stats = rows.new_zeros((STATS_ROWS, 2 * p.batch))
        stats[:, torch.cat([idx, idx + p.batch])] = rows
        return loss, stats

    @staticmethod
    def backward(fn, args: _SetupArgs, z, z_aug, k, tau, row_stats, grad):
        from .cpu import extension_inputs
        from .cpu.build import extension
        from .cpu.function import _option_args, upstream_rows

        p = args.prepare(z, z_aug, k, tau)
        o = p.options
        found = _SetupCPU._problem(p)
        if found is None:
            from .reference import adaptive_info_nce_reference

            return _SetupRecompute.backward(adaptive_info_nce_reference, args, z, z_aug, k, tau, row_stats, grad)
        sub, idx, per_row = found
        zc, zac, k_rows, labels, setup, tau_c = extension_inputs(sub, tau_grad=tau is not None)
        b_sub = sub.batch
        rows_sub = setup.loss_rows(b_sub)
        g = grad.to(zc.dtype)
        if o.reduction == "none" and per_row is not None:
            g = g[per_row]
        u = upstream_rows(g, o.reduction, rows_sub, zc.dtype)
        if setup.layout == 2 and o.reduction == "sum":
            u = u / 2
        if rows_sub < 2 * b_sub:
            u = torch.cat([u, u.new_zeros(2 * b_sub - rows_sub)])
        stats = row_stats if idx is None else row_stats[:, torch.cat([idx, idx + p.batch])].contiguous()
        soft_k = k is not None and o.threshold == "soft"
        tau_value = None if tau_c is None else float(tau_c)
        dz, dza, dk_rows, dtau = extension().backward_setup(zc, zac, k_rows, labels, *setup.args(), stats, u,
                                                            *_option_args(o, tau_value), soft_k)
        if idx is not None:
            dz = dz.new_zeros((p.batch, dz.shape[1])).index_put((idx,), dz)
            dza = dza.new_zeros((p.batch, dza.shape[1])).index_put((idx,), dza)
        dk = z.new_empty((0,))
        if k is not None:
            if soft_k:
                dk_rows = dk_rows[:rows_sub]
                if per_row is not None:
                    dk_rows = dk_rows.new_zeros(p.rows).index_put((per_row,), dk_rows)
                dk = _fold_setup_rows(dk_rows, k, p.batch)
            else:
                dk = torch.zeros_like(k)  # the hard threshold is flat in k
        dtau = dtau.to(tau.dtype) if tau is not None else z.new_empty((0,))
        return dz.to(z.dtype), dza.to(z_aug.dtype), dk, dtau


def _fold_setup_rows(dk_rows: torch.Tensor, k: torch.Tensor, b: int) -> torch.Tensor:
    """dL/dk in k's shape from the gradients of the loss's rows (B or 2B of them)."""
    if k.dim() == 0:
        return dk_rows.sum().to(k.dtype)
    if k.shape[0] == b and dk_rows.shape[0] == 2 * b:
        return (dk_rows[:b] + dk_rows[b:]).to(k.dtype)
    return dk_rows.clone().to(k.dtype)


def _setup_adapter(fn):
    from . import cpu

    return _SetupCPU if fn is cpu.adaptive_info_nce_cpu else _SetupRecompute


if AVAILABLE:

    def _split(args):
        """(z, z_aug, k, tau, _SetupArgs, backend) from the setup op's arguments."""
        z, z_aug, k, k_value, labels, tau, negatives, log_q, mask = args[:9]
        return z, z_aug, k, tau, _SetupArgs(k_value, labels, negatives, log_q, mask, tuple(args[9:-1])), args[-1]

    @torch.library.custom_op("adaptive_cl::info_nce_setup", mutates_args=(), schema=SETUP_FORWARD_SCHEMA)
    def info_nce_setup_op(*args):
        z, z_aug, k, tau, extra, backend = _split(args)
        p = extra.prepare(z, z_aug, k, tau)
        fn = backends.resolve(backend, p)
        return _setup_adapter(fn).forward(fn, p)

    @info_nce_setup_op.register_fake
    def _info_nce_setup_fake(*args):
        z, z_aug, k, tau, extra, backend = _split(args)
        p = extra.prepare(z, z_aug, k, tau)
        rows, dtype = _setup_adapter(backends.resolve(backend, p)).stats_meta(p)
        shape = (p.rows,) if p.options.reduction == "none" else ()
        return z.new_empty(shape, dtype=p.compute_dtype), z.new_empty((rows, 2 * p.batch), dtype=dtype)

    @torch.library.custom_op("adaptive_cl::info_nce_setup_backward", mutates_args=(), schema=SETUP_BACKWARD_SCHEMA)
    def info_nce_setup_backward_op(grad, *args):
        row_stats = args[9]
        z, z_aug, k, tau, extra, backend = _split(args[:9] + args[10:])
        fn = backends.resolve(backend, extra.prepare(z, z_aug, k, tau))
        return _setup_adapter(fn).backward(fn, extra, z, z_aug, k, tau, row_stats, grad)

    @info_nce_setup_backward_op.register_fake
    def _info_nce_setup_backward_fake(grad, z, z_aug, k, k_value, labels, tau, *rest):
        dk = z.new_empty((0,)) if k is None else torch.empty_like(k)
        dtau = z.new_empty((0,)) if tau is None else torch.empty_like(tau)
        return torch.empty_like(z), torch.empty_like(z_aug), dk, dtau

    def _setup_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*[t if isinstance(t, torch.Tensor) else None for t in inputs[:9]], output[1])
        ctx.k_value = inputs[3]
        ctx.rest = inputs[9:]

    def _setup_backward(ctx, grad, _grad_row_stats):
        z, z_aug, k, _, labels, tau, negatives, log_q, mask, row_stats = ctx.saved_tensors
        dz, dza, dk, dtau = info_nce_setup_backward_op(grad, z, z_aug, k, ctx.k_value, labels, tau, negatives,
                                                       log_q, mask, row_stats, *ctx.rest)
        return (dz, dza, dk if k is not None else None, None, None, dtau if tau is not None else None) + (None,) * 15

    info_nce_setup_op.register_autograd(_setup_backward, setup_context=_setup_setup_context)


def info_nce_setup(p: Prepared, backend: str) -> torch.Tensor:
    """The reduced loss of prepared inputs with the issue-24 setups through the registered
    setup op (what ``adaptive_info_nce`` calls for them under torch.compile)."""
    o = p.options
    k = None if p.k_rows is None or p.k_scalar is not None else p.k_rows
    temperature = 1.0 if p.temperature is not None else o.temperature
    loss, _ = torch.ops.adaptive_cl.info_nce_setup(
        p.z, p.z_aug, k, p.k_scalar, p.labels_rows, p.temperature, p.negatives, p.log_q, p.mask, temperature,
        o.normalize, o.denominator, o.weighting, o.positive_weight, o.threshold, o.threshold_scale, o.reduction,
        o.layout, o.symmetric, o.same_label, backend)
    return loss


def info_nce(p: Prepared, backend: str) -> torch.Tensor:
    """The reduced loss of prepared inputs through the registered op (what
    ``adaptive_info_nce`` calls under torch.compile)."""
    o = p.options
    k = None if p.k_rows is None or p.k_scalar is not None else p.k_rows
    loss, _ = torch.ops.adaptive_cl.info_nce(
        p.z, p.z_aug, k, p.k_scalar, p.labels_rows, o.temperature, o.normalize, o.denominator,
        o.weighting, o.positive_weight, o.threshold, o.threshold_scale, o.reduction, backend)
    return loss
