"""RCL: relative contrastive learning with strong and weak positives (Wang et al., CIKM 2024,
arXiv 2504.19178), on the DuoRec protocol's training samples. Equation and section numbers are
the paper's (its text ships as CIKM.pdf in the authors' repository, Cloudcatcher888/RCL).

Positives (the paper's Section 3.1):

- strong: a training sample with the same target item (``SameTargetIndex``, as DuoRec);
- weak: a sample of a user whose *training history* is among the most similar to the anchor
  user's. Similarity is Jaccard over the sets of items (``ngram=1``, Eq. 6) or of consecutive
  item pairs (``ngram=2``, Eq. 8: the variant behind the paper's published table). Each user
  keeps the top fraction ``alpha`` of the other users (ranked by similarity, ties to the lower
  row; users sharing nothing, s = 0, are never kept: Eq. 10 gives them probability 0 anyway),
  and each step draws one of them with probability proportional to s (Eq. 10). A user stands
  for its longest training sample (its history up to the last training item, which is that
  sample's target). Computed once, with sparse matrix products in row blocks (no
  ``O(U^2)`` loop, memory ``O(block x U)``), and cached on disk (see :func:`weak_positives`).

The loss (Section 3.2), per anchor row u of a batch, with ``L(u, x)`` the row-u InfoNCE loss of
the pair (u, x) among the 2B views ``[h_u; h_x]`` (Eq. 12: the denominator holds every view but
u itself, i.e. ``adaptive_info_nce`` with ``k=None``):

    L_wRCL = mean_u [ 1{u has a strong positive a} L(u, a)
                      + 1{u has a weak positive b} w_u max(L~(u, b), L(u, a)) ]      (Eq. 17)

The ``max`` is the relative bound: a weak pair may not end up closer than the strong pair of
its row; when it would (``L~(u, b) < L(u, a)``) the gradient reaches the strong pair instead.
Without a strong positive (a target nobody else has) the weak term is unbounded (Eq. 15).
``L~`` depends on ``weighting``:

- ``"similarity"`` (Eq. 16, the default): ``-log s_ub e^{x_ub} / sum_{c != u} s_uc e^{x_uc}``
  with ``s`` the Jaccard of the users' training histories, for every view c in the batch. A
  candidate sharing nothing with u (s = 0) drops out of the denominator, so on sparse data
  like Beauty many rows contrast against few views. The fused loss has no per-pair weights,
  so this one term is computed here in PyTorch (a (B, 2B) matrix).
- ``"row"`` (the authors' released code): ``L~ = L``, each row weighted by ``s_ub ** power``
  (power 0.1 there), normalised to mean 1 over the rows that have a weak positive.
- ``"none"`` (Eq. 14): ``L~ = L``, ``w_u = 1``.

Differences from the paper, deliberately: it sums over u, here the mean over the batch (the
weight lambda absorbs the scale); it has one sequence per user, here every prefix is a sample
and the similarity is measured between users' training histories. The released code differs
further (item-overlap counts instead of Jaccard, a global percentile instead of a per-user top
fraction, the bound applied to logits with the batch's smallest strong logit); only its per-row
weights are offered, as ``weighting="row"``.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .atomic import atomic_savez
from .data import LeaveOneOutSplit
from .model import SASRec
from .objectives import Batch, ContrastiveTerm, ObjectiveOutput, _check_weight, encode

WEIGHTINGS = ("similarity", "row", "none")
NGRAMS = (1, 2)
#: Bump when the cached arrays' meaning changes, so old cache files are never read.
CACHE_VERSION = 1


# ------------------------------------------------------------------------ weak positives


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    return float(alpha)


def _check_ngram(ngram: int) -> int:
    if ngram not in NGRAMS or isinstance(ngram, bool):
        raise ValueError(f"ngram must be one of {NGRAMS}, got {ngram!r}")
    return ngram


def history_features(
    split: LeaveOneOutSplit, ngram: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sets the similarity compares: one row per user with at least one training sample.

    Returns ``(indptr, features, sample_row, last_sample)``: row r's sorted distinct features
    (item ids, or ids of consecutive item pairs for ``ngram=2``) are
    ``features[indptr[r]:indptr[r + 1]]``; ``sample_row[i]`` is the row of training sample i's
    user and ``last_sample[r]`` the index of row r's longest training sample.
    """
    _check_ngram(ngram)
    history = split.valid_history  # each evaluation user's training part
    lengths = np.diff(history.indptr)
    samples = lengths - 1  # a training part of n - 2 items gives n - 3 samples
    users = np.flatnonzero(samples > 0)
    items = history.items.cpu().numpy().astype(np.int64)
    row_of_entry = np.repeat(np.arange(len(lengths)), lengths)
    if ngram == 2:
        # Pairs (x_t, x_t+1) inside one user's part, encoded as one integer.
        same = row_of_entry[1:] == row_of_entry[:-1]
        base = split.num_items + 1
        feature = items[:-1][same] * base + items[1:][same]
        row_of_entry = row_of_entry[:-1][same]
        width = base * base
    else:
        feature, width = items, split.num_items + 1
    keep = samples[row_of_entry] > 0
    row = np.searchsorted(users, row_of_entry[keep])
    key = np.unique(row * width + feature[keep])  # sorted by row, then feature; deduplicated
    row, feature = key // width, key % width
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=len(users)))])
    # leave_one_out orders samples by evaluation row, then by position.
    sample_row = np.searchsorted(users, np.repeat(np.arange(len(lengths)), samples))
    if len(sample_row) != split.num_train:
        raise ValueError(f"the split's histories give {len(sample_row)} samples, "
                         f"not its {split.num_train}")
    last_sample = np.cumsum(samples)[users] - 1
    return indptr.astype(np.int64), feature.astype(np.int64), sample_row, last_sample


def _coo(indptr: np.ndarray, columns: np.ndarray, num_columns: int) -> torch.Tensor:
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    index = torch.from_numpy(np.stack([rows, columns]))
    return torch.sparse_coo_tensor(index, torch.ones(len(columns)),
                                   (len(indptr) - 1, num_columns),
                                   check_invariants=False).coalesce()


def top_similar(
    indptr: np.ndarray, features: np.ndarray, alpha: float, block: int = 2048
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's top ``ceil(alpha * (rows - 1))`` other rows by Jaccard, s > 0 only.

    Intersections come from sparse products ``X[block] @ X.T`` (exact integer counts), so the
    cost follows the number of overlapping pairs, not rows squared. Order within a row:
    similarity descending, ties to the lower row index (a total order, the same everywhere).
    Returns CSR ``(indptr, neighbours, similarities)``, similarities in float64.
    """
    alpha = _check_alpha(alpha)
    rows = len(indptr) - 1
    keep = max(1, math.ceil(alpha * (rows - 1)))
    _, compact = np.unique(features, return_inverse=True)
    num_features = int(compact.max()) + 1 if len(compact) else 1
    sizes = np.diff(indptr).astype(np.float64)
    transposed = _coo(indptr, compact, num_features).t().coalesce()
    parts_row, parts_col, parts_sim = [], [], []
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        part = _coo(indptr[start:stop + 1] - indptr[start],
                    compact[indptr[start]:indptr[stop]], num_features)
        with warnings.catch_warnings():  # torch's "sparse CSR is beta" notice, used inside mm
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            inter = torch.sparse.mm(part, transposed).coalesce()
        r, c = inter.indices().numpy()
        counts = inter.values().numpy().astype(np.float64)
        r = r + start
        other = r != c
        r, c, counts = r[other], c[other], counts[other]
        sim = counts / (sizes[r] + sizes[c] - counts)
        order = np.lexsort((c, -sim, r))
        r, c, sim = r[order], c[order], sim[order]
        first = np.searchsorted(r, r, side="left")  # where each entry's row starts
        top = np.arange(len(r)) - first < keep
        parts_row.append(r[top])
        parts_col.append(c[top])
        parts_sim.append(sim[top])
    r = np.concatenate(parts_row) if parts_row else np.zeros(0, np.int64)
    out_indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=rows))])
    return (out_indptr.astype(np.int64),
            np.concatenate(parts_col).astype(np.int64) if parts_col else np.zeros(0, np.int64),
            np.concatenate(parts_sim) if parts_sim else np.zeros(0))


def cache_key(indptr: np.ndarray, features: np.ndarray, alpha: float, ngram: int) -> str:
    """A fingerprint of everything the weak positives depend on: the compared sets (which
    encode the data, its k-core filtering and the split), ``alpha``, ``ngram`` and the
    cache format."""
    digest = hashlib.sha256()
    digest.update(f"rcl-weak-positives v{CACHE_VERSION} alpha={alpha!r} ngram={ngram}".encode())
    for array in (indptr, features):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _load_cache(path: Path, key: str) -> tuple[np.ndarray, ...] | None:
    """The cached neighbours, or None when the file is absent, unreadable or for other data
    (a damaged cache is recomputed, never trusted)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                return None
            return (f["indptr"], f["neighbours"].astype(np.int64),
                    f["similarities"].astype(np.float64))
    except (OSError, ValueError, KeyError, EOFError):
        return None


def weak_positives(
    split: LeaveOneOutSplit,
    alpha: float = 0.05,
    ngram: int = 1,
    cache_dir: str | Path | None = None,
) -> WeakPositives:
    """Build (or read from ``cache_dir``) the weak-positive index of ``split``.

    The cache file is ``cache_dir/rcl-weak-<key>.npz`` with ``key`` from :func:`cache_key`;
    it is written atomically, so a crash never leaves a partial file that a later run reads,
    and a file for other data or settings is never used. ``cache_dir=None`` keeps nothing on
    disk.
    """
    alpha, ngram = _check_alpha(alpha), _check_ngram(ngram)
    indptr, features, sample_row, last_sample = history_features(split, ngram)
    key = cache_key(indptr, features, alpha, ngram)
    neighbours = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"rcl-weak-{key[:32]}.npz"
        neighbours = _load_cache(path, key)
    if neighbours is None:
        neighbours = top_similar(indptr, features, alpha)
        # What the cache stores, so that a fresh and a cached run draw identically.
        neighbours = (neighbours[0], neighbours[1],
                      neighbours[2].astype(np.float32).astype(np.float64))
        if cache_dir is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # int32 / float32 halve the file (Beauty: ~40 MB); the draw needs no more.
            atomic_savez(path, key=np.array(key), indptr=neighbours[0],
                          neighbours=neighbours[1].astype(np.int32),
                          similarities=neighbours[2].astype(np.float32))
    return WeakPositives(*neighbours, sample_row, last_sample, indptr, features)


class WeakPositives(nn.Module):
    """The weak-positive index on the device: per user row its similar rows (CSR) and their
    Jaccard similarities, each training sample's row, each row's longest sample, and the
    rows' feature sets padded for in-batch similarities. Tensors are non-persistent buffers:
    they follow ``.to(device)`` and stay out of checkpoints (they are rebuilt or re-read)."""

    def __init__(
        self,
        indptr: np.ndarray,
        neighbours: np.ndarray,
        similarities: np.ndarray,
        sample_row: np.ndarray,
        last_sample: np.ndarray,
        feature_indptr: np.ndarray,
        features: np.ndarray,
    ) -> None:
        super().__init__()
        similarities = np.asarray(similarities, np.float64)
        if len(similarities) and not (similarities > 0).all():
            raise ValueError("weak positives need similarities > 0 (Eq. 10 samples by them)")
        buffers = dict(
            indptr=torch.from_numpy(np.asarray(indptr, np.int64)),
            neighbours=torch.from_numpy(np.asarray(neighbours, np.int64)),
            similarities=torch.from_numpy(similarities),
            # Cumulative similarities: Eq. 10's draw is a search in one row's segment.
            cumulative=torch.from_numpy(np.cumsum(similarities)),
            sample_row=torch.from_numpy(np.asarray(sample_row, np.int64)),
            last_sample=torch.from_numpy(np.asarray(last_sample, np.int64)),
            padded=_padded(feature_indptr, features),
        )
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor, persistent=False)

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1

    def counts(self) -> torch.Tensor:
        """Weak positives per user row."""
        return self.indptr[1:] - self.indptr[:-1]

    def sample(
        self, index: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One weak positive per training sample in ``index``, drawn with probability
        proportional to similarity (Eq. 10), on ``index``'s device without a host sync.

        Returns ``(samples, has_weak, similarity)``; a row without weak positives gets its
        own sample, ``has_weak=False`` and similarity 0.
        """
        index = index.to(self.indptr.device)
        row = self.sample_row[index]
        lo, hi = self.indptr[row], self.indptr[row + 1]
        has = hi > lo
        u = torch.rand(index.shape, generator=generator, device=index.device,
                       dtype=torch.float64)
        if len(self.cumulative) == 0:
            return index, has, torch.zeros(index.shape, dtype=torch.float64,
                                           device=index.device)
        cum = self.cumulative
        base = torch.where(lo > 0, cum[(lo - 1).clamp_min(0)], torch.zeros_like(u))
        total = torch.where(has, cum[(hi - 1).clamp_min(0)] - base, torch.zeros_like(u))
        position = torch.searchsorted(cum, base + u * total, right=True)
        # Rounding can land one past the segment; clamp keeps the draw inside it.
        position = torch.minimum(torch.maximum(position, lo), (hi - 1).clamp_min(0))
        neighbour = torch.where(has, self.neighbours[position], row)
        samples = torch.where(has, self.last_sample[neighbour], index)
        return samples, has, torch.where(has, self.similarities[position], torch.zeros_like(u))

    def pair_similarity(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Jaccard of the feature sets of user ``rows`` (B,) and user ``columns`` (M,): (B, M)
        float32, exact for sets below 2^24 elements. Features are renumbered per batch
        (``torch.unique``: one host sync), so the dense incidence is (B + M) x (distinct
        features in the batch), not x (all items)."""
        sets = self.padded[torch.cat([rows, columns])]
        ids, inverse = torch.unique(sets, return_inverse=True)
        incidence = torch.zeros(len(sets), len(ids), device=sets.device)
        incidence.scatter_(1, inverse, 1.0)
        incidence[:, 0] *= (ids[0] != 0).float()  # 0 is padding (ids are shifted by one)
        a, c = incidence[: len(rows)], incidence[len(rows):]
        inter = a @ c.T
        union = a.sum(1)[:, None] + c.sum(1)[None, :] - inter
        return inter / union.clamp_min(1.0)


def _padded(indptr: np.ndarray, features: np.ndarray) -> torch.Tensor:
    """Row r's features shifted by one, left-aligned, 0-padded: ``(rows, longest row)``."""
    lengths = np.diff(indptr)
    width = max(int(lengths.max()) if len(lengths) else 1, 1)
    _, compact = np.unique(features, return_inverse=True)
    out = np.zeros((len(lengths), width), np.int64)
    row = np.repeat(np.arange(len(lengths)), lengths)
    column = np.arange(len(features)) - np.repeat(indptr[:-1], lengths)
    out[row, column] = compact + 1
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------- loss


def similarity_weighted_info_nce(
    z: torch.Tensor,
    z_pos: torch.Tensor,
    weights: torch.Tensor,
    temperature: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """RCL's Eq. 16 for each anchor row i < B over the 2B views ``[z; z_pos]``:
    ``-log(w[i, B+i] e^{x_i,B+i} / sum_{c != i} w[i, c] e^{x_ic})``, ``x = sim / temperature``.

    ``weights`` is (B, 2B), >= 0, with ``weights[i, B + i] > 0`` (else that row's loss is inf).
    Returns the B per-row losses in float32 (float64 for float64 inputs).
    """
    b = len(z)
    if z.shape != z_pos.shape or z.dim() != 2 or weights.shape != (b, 2 * b):
        raise ValueError(f"z, z_pos must be equal (B, D) and weights (B, 2B); got "
                         f"{tuple(z.shape)}, {tuple(z_pos.shape)}, {tuple(weights.shape)}")
    dtype = torch.promote_types(z.dtype, torch.float32)
    views = torch.cat([z, z_pos]).to(dtype)
    if normalize:
        views = F.normalize(views, dim=1)
    with torch.autocast(z.device.type, enabled=False):
        logits = views[:b] @ views.T / temperature
    log_w = torch.log(weights.to(dtype))
    own = torch.arange(b, device=z.device)
    log_w = log_w.index_put((own, own), torch.tensor(-math.inf, dtype=dtype, device=z.device))
    weighted = logits + log_w
    return torch.logsumexp(weighted, dim=1) - weighted[own, own + b]


def relative_contrastive_loss(
    strong: torch.Tensor,
    weak: torch.Tensor,
    has_strong: torch.Tensor,
    has_weak: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 17 averaged over the B rows: ``1{strong} L_s + 1{weak} w max(L_w, L_s)``, the
    weak term unbounded where a row has no strong positive (Eq. 15). Masked rows contribute
    exactly 0 (``where``, so a non-finite masked value cannot leak in)."""
    bounded = torch.where(has_strong, torch.maximum(weak, strong), weak)
    if weights is not None:
        bounded = bounded * weights
    zero = torch.zeros_like(strong)
    return (torch.where(has_strong, strong, zero) + torch.where(has_weak, bounded, zero)).mean()


class RCLObjective(nn.Module):
    """CE + weight * L_wRCL (Eq. 18), the anchor being the CE pass of the sequence.

    Args:
        weak: the weak-positive index of the training samples (:func:`weak_positives`).
        train_inputs: all training inputs (the weak positives' sequences are looked up).
        has_partner: per training sample, whether another sample shares its target.
        term: the InfoNCE setting (and optional SimThres) of the strong and weak terms.
        weight: lambda of Eq. 18.
        weighting: ``"similarity"`` (Eq. 16), ``"row"`` (released code) or ``"none"``.
        weight_power: the exponent of ``"row"``'s weights ``s ** power`` (code: 0.1).
    """

    needs_positives = True

    def __init__(
        self,
        weak: WeakPositives,
        train_inputs: torch.Tensor,
        has_partner: torch.Tensor,
        term: ContrastiveTerm,
        weight: float = 0.1,
        weighting: str = "similarity",
        weight_power: float = 0.1,
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if weighting == "similarity" and term.simthres is not None:
            raise ValueError("weighting='similarity' (Eq. 16) is not an adaptive_info_nce loss, "
                             "so a SimThres cannot act on it: use weighting 'row' or 'none'")
        if not weight_power >= 0:
            raise ValueError(f"weight_power must be >= 0, got {weight_power!r}")
        if len(train_inputs) != len(has_partner) or len(has_partner) != len(weak.sample_row):
            raise ValueError("train_inputs, has_partner and weak must cover the same samples")
        self.weak = weak
        self.term = term
        self.weight = _check_weight(weight)
        self.weighting = weighting
        self.weight_power = float(weight_power)
        self.register_buffer("train_inputs", train_inputs, persistent=False)
        self.register_buffer("has_partner", has_partner.bool(), persistent=False)

    @property
    def simthres(self):
        return self.term.simthres

    def forward(
        self, model: SASRec, batch: Batch, generator: torch.Generator | None = None
    ) -> ObjectiveOutput:
        if batch.positives is None or batch.index is None:
            raise ValueError("RCL needs batch.positives (same-target samples) and batch.index")
        b = len(batch.inputs)
        weak_index, has_weak, similarity = self.weak.sample(batch.index, generator)
        h, h_strong, h_weak = encode(model, batch.inputs, batch.positives,
                                     self.train_inputs[weak_index])
        ce = model.loss(h, batch.targets)
        has_strong = self.has_partner[batch.index]

        k = self.term.threshold(h)
        strong = self.term(h, h_strong, k, reduction="none")[:b]
        row_weights = None
        if self.weighting == "similarity":
            rows = self.weak.sample_row[batch.index]
            columns = torch.cat([rows, self.weak.sample_row[weak_index]])
            s = self.weak.pair_similarity(rows, columns)
            weak = similarity_weighted_info_nce(h, h_weak, s, self.term.temperature,
                                                self.term.normalize)
        else:
            weak = self.term(h, h_weak, k, reduction="none")[:b]
            if self.weighting == "row":
                w = similarity.float() ** self.weight_power
                mean = (w * has_weak).sum() / has_weak.sum().clamp_min(1)
                row_weights = w / mean.clamp_min(torch.finfo(w.dtype).tiny)
        cl = relative_contrastive_loss(strong, weak.to(strong.dtype), has_strong, has_weak,
                                       row_weights)
        loss = ce + self.weight * cl
        parts = {"ce": ce.detach(), "cl": cl.detach(),
                 "strong": strong.detach().mean(), "weak": weak.detach().mean(),
                 "bound_active": (has_strong & has_weak & (weak < strong)).float().mean()}
        reg = self.term.regularizer(k)
        if reg is not None:
            loss = loss + reg
            parts["reg"] = reg.detach()
        return ObjectiveOutput(loss, parts, (h, h_strong), k)
