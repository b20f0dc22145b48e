"""The issue-24 setups (cross layout, symmetric, a queue, logQ, exclusion, a mask, a tensor
temperature) written a second time, independently of adaptive_cl.reference: one Python loop
per row over its columns, in float64. Shared by the reference tests and the backend tests.

Also: a covering design over the new options x the old ones, inputs for each case, and the
norm-wise error bound the comparisons use."""

from __future__ import annotations

import math

import torch

from kernels._cases import pairwise_cases

EPS64 = torch.finfo(torch.float64).eps

#: The factors of the covering design: every pair of values appears in some case.
FACTORS = {
    "layout": ["views", "cross", "cross-sym"],
    "queue": [0, 3],
    "log_q": [False, True],
    "labels": ["none", "positive", "exclude"],
    "mask": [False, True],
    "tau": ["float", "tensor"],
    "k": ["none", "float", "rows", "soft"],
    "denominator": ["negatives", "all"],
    "weighting": ["normalized", "unit"],
    "normalize": [True, False],
    "reduction": ["mean", "sum", "none"],
    "shape": [(5, 3), (7, 5), (2, 1)],
}


def allowed(case: dict) -> bool:
    if case["layout"] == "cross-sym" and (case["queue"] or case["log_q"]):
        return False  # a queue and log_q are refused with symmetric=True
    if case["layout"] == "views" and case["log_q"]:
        return False  # log_q needs the cross layout
    return True


def covering_cases(seed: int = 0) -> list[dict]:
    return pairwise_cases(FACTORS, allowed, seed=seed)


def make_case(case: dict, seed: int, dtype=torch.float64, device="cpu"):
    """(z, z_aug, k, kwargs) for ``adaptive_info_nce`` from a case of the design."""
    b, d = case["shape"]
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=g, dtype=torch.float64)
    z_aug = z + 0.7 * torch.randn(b, d, generator=g, dtype=torch.float64)
    m = case["queue"]
    kw: dict = {"denominator": case["denominator"], "weighting": case["weighting"],
                "normalize": case["normalize"], "reduction": case["reduction"], "positive_weight": 0.4}
    if case["layout"] != "views":
        kw["layout"] = "cross"
    if case["layout"] == "cross-sym":
        kw["symmetric"] = True
    if m:
        kw["negatives"] = torch.randn(m, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if case["log_q"]:
        kw["log_q"] = torch.log(torch.rand(b + m, generator=g, dtype=torch.float64) * 0.9 + 0.05).to(device)
    if case["labels"] != "none":
        # few distinct labels so that some pairs share one; the queue's labels given half the time
        n_lab = b + m if (m and seed % 2) else b
        if case["layout"] == "views":
            n_lab = 2 * b + m if (m and seed % 2) else b
        kw["labels"] = torch.randint(0, 3, (n_lab,), generator=g).to(device)
        kw["same_label"] = case["labels"]
    if case["mask"]:
        mask = torch.rand(b, generator=g) < 0.7
        mask[0] = True
        mask[-1] = b < 3 or bool(mask[-1])
        if b > 2:
            mask[1] = False
        kw["mask"] = mask.to(device)
    if case["tau"] == "tensor":
        kw["temperature"] = torch.tensor(0.3, dtype=torch.float64, device=device)
    else:
        kw["temperature"] = 0.3
    rows = 2 * b if case["layout"] != "cross" else b
    k = None
    if case["k"] == "float":
        k = 0.2 if case["normalize"] else 0.5
    elif case["k"] in ("rows", "soft"):
        k = (torch.rand(rows if seed % 2 else b, generator=g, dtype=torch.float64) * 0.6 - 0.1).to(device)
        if case["k"] == "soft":
            kw["threshold"] = "soft"
            kw["threshold_scale"] = 0.2
    if case["k"] == "none" and case["weighting"] == "unit":
        pass  # unit weighting needs alpha < 1, which 0.4 is
    return z.to(device=device, dtype=dtype), z_aug.to(device=device, dtype=dtype), k, kw


# --------------------------------------------------------------------------- the loop formulation
def _unit(v: torch.Tensor, normalize: bool) -> torch.Tensor:
    return v / max(float(v.norm()), 1e-12) if normalize else v


def loop_rows(z, z_aug, k=None, *, temperature=1.0, normalize=True, labels=None, layout="views",
              symmetric=False, negatives=None, log_q=None, same_label="positive", mask=None,
              denominator="negatives", weighting="normalized", positive_weight=0.5, threshold="hard",
              threshold_scale=0.05, **_ignored):
    """(row losses, m, candidate similarities) in float64, one row at a time: the README's
    formulas read directly. Row order as reduction='none'."""
    z, z_aug = z.double(), z_aug.double()
    b = z.shape[0]
    queue = [] if negatives is None else list(negatives.double())
    m_q = len(queue)
    tau = float(temperature)
    alpha = positive_weight
    valid = [True] * b if mask is None else [bool(x) for x in mask]
    lab = None if labels is None else [int(x) for x in labels]

    def label_of(kind, idx):
        """The label of a row/column: kind 'pair' (index into the B pairs), 'view' (into N rows,
        views layout), 'queue'."""
        if lab is None:
            return None
        if kind == "queue":
            own = 2 * b if layout == "views" else b
            return lab[own + idx] if len(lab) == own + m_q else None
        if kind == "view":
            return lab[idx] if len(lab) >= 2 * b else lab[idx % b]
        return lab[idx]

    # rows: (vector, pair index, label, threshold index); columns: (vector, pair index or None,
    # label, log q)
    directions = []
    if layout == "views":
        views = list(z) + list(z_aug)
        rows = [(views[i], i % b, label_of("view", i), i, (i + b) % (2 * b), i) for i in range(2 * b)]
        cols = [(views[j], j % b, label_of("view", j), 0.0) for j in range(2 * b)]
        directions.append((rows, cols))
    else:
        rows = [(z[i], i, label_of("pair", i), i, i, None) for i in range(b)]
        cols = [(z_aug[j], j, label_of("pair", j), 0.0) for j in range(b)]
        directions.append((rows, cols))
        if symmetric:
            rows2 = [(z_aug[i], i, label_of("pair", i), b + i, i, None) for i in range(b)]
            cols2 = [(z[j], j, label_of("pair", j), 0.0) for j in range(b)]
            directions.append((rows2, cols2))
    for rows, cols in directions[:1]:
        cols.extend((q, None, label_of("queue", t), 0.0) for t, q in enumerate(queue))
    if log_q is not None:
        rows, cols = directions[0]
        directions[0] = (rows, [(v, p, lb, float(log_q[j])) for j, (v, p, lb, _) in enumerate(cols)])

    def k_of(t):
        if k is None:
            return None
        if isinstance(k, float):
            return k
        kk = k.double()
        if kk.dim() == 0:
            return float(kk)
        return float(kk[t]) if kk.shape[0] > b else float(kk[t % b])

    losses, ms, sims = [], [], []
    for rows, cols in directions:
        for vec, pair, row_label, t, partner, self_col in rows:
            if not valid[pair]:
                losses.append(0.0)
                ms.append(0.0)
                continue
            x = _unit(vec, normalize)

            def sim(col):
                c = float(x @ _unit(col[0], normalize))
                return min(max(c, -1.0), 1.0) if normalize else c

            s_p = sim(cols[partner]) / tau - cols[partner][3]
            den = [(1.0, s_p)]
            pos = []  # (a, s)
            for j, col in enumerate(cols):
                if j == partner or j == self_col or (col[1] is not None and not valid[col[1]]):
                    continue
                c = sim(col)
                s = c / tau - col[3]
                same = row_label is not None and col[2] is not None and row_label == col[2]
                if same and same_label == "exclude":
                    continue
                sims.append(c)
                kt = k_of(t)
                if same:
                    a, rest = 1.0, 0.0
                elif kt is None:
                    a, rest = 0.0, 1.0
                elif threshold == "hard":
                    a = 1.0 if c > kt else 0.0
                    rest = 1.0 - a
                else:
                    a = 1.0 / (1.0 + math.exp(-(c - kt) / threshold_scale))
                    rest = 1.0 / (1.0 + math.exp((c - kt) / threshold_scale))
                den.append((1.0 if denominator == "all" else rest, s))
                if a > 0:
                    pos.append((a, s))
            lse = math.log(sum(w * math.exp(s) for w, s in den))
            m = sum(a for a, _ in pos)
            if weighting == "normalized":
                loss = alpha * (lse - s_p) + (1 - alpha) / max(m, 1.0) * sum(a * (lse - s) for a, s in pos)
            else:
                loss = (lse - s_p) - math.log(alpha) + sum(
                    a * (lse - s - math.log((1 - alpha) / max(m, 1.0))) for a, s in pos)
            losses.append(loss)
            ms.append(m)
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(ms, dtype=torch.float64), sims


def loop_loss(z, z_aug, k=None, *, reduction="mean", mask=None, symmetric=False, **kw):
    """The reduced loss of ``loop_rows``: mean over the valid rows, "sum" halved with
    ``symmetric``."""
    rows, _, _ = loop_rows(z, z_aug, k, mask=mask, symmetric=symmetric, **kw)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum() / (2 if symmetric else 1)
    per_pair = rows.shape[0] // z.shape[0]
    valid = z.shape[0] if mask is None else int(mask.sum())
    return rows.sum() / max(valid * per_pair, 1)


def normwise_bound(length: int, scale: float, eps: float = EPS64, factor: float = 16.0) -> float:
    """The accepted ||out - ref|| for a result built from reductions of ``length`` terms whose
    magnitudes are about ``scale``: factor * eps * length * scale (the classic summation bound)."""
    return factor * eps * length * max(scale, 1.0)
