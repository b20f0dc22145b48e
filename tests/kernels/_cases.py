"""Shared helpers for the kernel tests: a pairwise covering design, inputs with thresholds away
from ties, and error measures against the float64 reference."""

from __future__ import annotations

import itertools
import random

import torch
import torch.nn.functional as F


def pairwise_cases(factors: dict, allowed=lambda case: True, *, seed: int = 0, tries: int = 60):
    """A small list of cases (dicts) in which every pair of values of two factors appears at
    least once (greedy AETG-style construction; deterministic for a given seed)."""
    names = list(factors)
    rng = random.Random(seed)
    uncovered = set()
    for a, b in itertools.combinations(range(len(names)), 2):
        for va in range(len(factors[names[a]])):
            for vb in range(len(factors[names[b]])):
                uncovered.add((a, va, b, vb))

    def allowed_pair(a, va, b, vb):
        # A pair is coverable if some full case containing it is allowed (checked by sampling).
        for _ in range(200):
            idx = [rng.randrange(len(factors[n])) for n in names]
            idx[a], idx[b] = va, vb
            if allowed({n: factors[n][i] for n, i in zip(names, idx)}):
                return True
        return False

    uncovered = {p for p in uncovered if allowed_pair(*p)}
    cases = []
    while uncovered:
        best, best_gain = None, -1
        for _ in range(tries):
            order = list(range(len(names)))
            rng.shuffle(order)
            # Seed the candidate with one uncovered pair so every round makes progress.
            a, va, b, vb = rng.choice(sorted(uncovered))
            idx = {a: va, b: vb}
            for f in order:
                if f in idx:
                    continue
                scores = []
                for v in range(len(factors[names[f]])):
                    gain = sum((min(f, g), v if f < g else idx[g], max(f, g), idx[g] if f < g else v)
                               in uncovered for g in idx)
                    scores.append((gain, rng.random(), v))
                idx[f] = max(scores)[2]
            case = {names[f]: factors[names[f]][v] for f, v in idx.items()}
            if not allowed(case):
                continue
            gain = sum((a2, idx[a2], b2, idx[b2]) in uncovered
                       for a2, b2 in itertools.combinations(range(len(names)), 2))
            if gain > best_gain:
                best, best_gain = idx, gain
        if best is None:
            raise RuntimeError("could not build an allowed case")
        for a2, b2 in itertools.combinations(range(len(names)), 2):
            uncovered.discard((a2, best[a2], b2, best[b2]))
        cases.append({n: factors[n][best[i]] for i, n in enumerate(names)})
    return cases


def covers_all_pairs(cases, factors, allowed=lambda case: True) -> list:
    """Pairs (name_a, value_a, name_b, value_b) never seen together (ignoring impossible ones)."""
    names = list(factors)
    missing = []
    for a, b in itertools.combinations(names, 2):
        for va in factors[a]:
            for vb in factors[b]:
                if any(c[a] == va and c[b] == vb for c in cases):
                    continue
                probe = dict(cases[0], **{a: va, b: vb})
                if allowed(probe):
                    missing.append((a, va, b, vb))
    return missing


def make_views(batch, dim, dtype, *, seed, normalize=True, layout="contiguous", device="cpu", noise=0.7):
    """(z, z_aug) in ``dtype`` with correlated views (z_aug = z + noise * N(0, 1)); "noncontig"
    returns strided views. A larger ``noise`` keeps the partner from dominating at small tau
    (there, with a dominant partner, a row's gradient is a difference of nearly equal terms that
    no float32 evaluation gets to a small relative error)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    za = z + noise * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    if not normalize:  # keep raw dot products O(1) so logits stay in a sane range
        z, za = z / dim ** 0.5, za / dim ** 0.5
    z, za = z.to(device=device, dtype=dtype), za.to(device=device, dtype=dtype)
    if layout == "noncontig":
        # z: a column-major copy (stride (1, B)); z_aug: every other column of a wider tensor.
        z = z.t().contiguous().t()
        wide = torch.zeros(batch, 2 * dim, dtype=dtype, device=device)
        wide[:, ::2] = za
        za = wide[:, ::2]
        assert not z.is_contiguous() or batch == 1 or dim == 1
        assert not za.is_contiguous() or dim == 1
    return z, za


def similarity64(z, za, normalize):
    s = torch.cat([z, za]).double()
    if normalize:
        s = F.normalize(s, dim=1)
    return s @ s.T


def _candidates(c, rows):
    n = c.shape[0]
    vals = []
    for i in rows:
        keep = torch.ones(n, dtype=torch.bool)
        keep[i] = False
        keep[(i + n // 2) % n] = False
        vals.append(c[i, keep])
    return torch.cat(vals)


def _widest_gap(values, lo_q=0.5, hi_q=0.97):
    v = torch.unique(values)
    v = torch.cat([v[:1] - 1.0, v, v[-1:] + 1.0])  # allow k below / above every value
    mids = (v[1:] + v[:-1]) / 2
    gaps = (v[1:] - v[:-1]) / 2
    lo, hi = torch.quantile(values, lo_q), torch.quantile(values, hi_q)
    ok = (mids >= lo) & (mids <= hi)
    if not bool(ok.any()):
        ok = torch.ones_like(ok)
    j = int(torch.argmax(torch.where(ok, gaps, torch.zeros_like(gaps))))
    if gaps[j] < 1e-4:  # degenerate (e.g. D = 1: every c is +-1): the widest gap anywhere
        j = int(torch.argmax(gaps))
    return float(mids[j]), float(gaps[j])


def pick_k(z, za, kind, normalize, dtype=torch.float32):
    """k of the given kind ("none", "scalar", "0d", "B", "N") at the middle of the widest gap
    between candidate similarities (so no c_ij lies near k), and the smallest such margin."""
    if kind == "none":
        return None, float("inf")
    c = similarity64(z, za, normalize)
    n = c.shape[0]
    b = n // 2
    if kind in ("scalar", "0d"):
        value, margin = _widest_gap(_candidates(c, range(n)))
        return (value if kind == "scalar" else torch.tensor(value, dtype=dtype)), margin
    groups = [[i, i + b] for i in range(b)] if kind == "B" else [[i] for i in range(n)]
    ks, margins = zip(*(_widest_gap(_candidates(c, g)) for g in groups))
    return torch.tensor(ks, dtype=dtype), min(margins)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (norm ratio; an absolute floor for an all-zero reference)."""
    out, ref = out.double(), ref.double()
    den = ref.norm()
    num = (out - ref).norm()
    return float(num / den) if den > 0 else float(num)


def case_id(case: dict) -> str:
    """A test id from a case of ``pairwise_cases``: each factor's value in order, shapes as
    B<b>D<d>, dtypes by name, booleans as the factor's name or ``no-`` it."""
    parts = []
    for name, value in case.items():
        if name == "shape":
            parts.append("B{}D{}".format(*value))
        elif isinstance(value, torch.dtype):
            parts.append(str(value).split(".")[-1])
        elif isinstance(value, bool):
            parts.append(name if value else f"no-{name}")
        else:
            parts.append(f"{name}={value}")
    return "-".join(parts)
