"""RCL: weak positives against brute force, the cache, Eq. 10's draw, the relative bound and
the similarity-weighted term."""

import math

import numpy as np
import pytest
import torch

from adaptive_cl import adaptive_info_nce
from adaptive_cl.rec import rcl
from adaptive_cl.rec.data import leave_one_out, load_dataset
from adaptive_cl.rec.model import SASRec
from adaptive_cl.rec.objectives import Batch, ContrastiveTerm
from adaptive_cl.rec.rcl import (
    RCLObjective,
    WeakPositives,
    history_features,
    relative_contrastive_loss,
    similarity_weighted_info_nce,
    top_similar,
    weak_positives,
)
from adaptive_cl.rec.simthres import StatisticalSimThres
from adaptive_cl.rec.synthetic import make_synthetic


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    """A small sequences file: overlapping histories, repeated items, ties in similarity."""
    rng = np.random.default_rng(7)
    lines = []
    for user in range(60):
        n = int(rng.integers(3, 12))
        pool = rng.integers(1, 25, size=n)  # 24 items: plenty of overlap and ties
        lines.append(f"{user + 1} " + " ".join(map(str, pool)))
    path = tmp_path_factory.mktemp("rcl") / "small.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def small_split(small_file):
    return leave_one_out(load_dataset(small_file, "sequences", kcore=None), 8)


def brute_force(split, alpha, ngram):
    """Every pair's Jaccard of the users' training parts by Python sets, then each user's top
    ceil(alpha (U - 1)) others with s > 0, similarity descending, ties to the lower row."""
    histories = []
    h = split.valid_history
    for r in range(len(h)):
        part = h.row(r).tolist()
        if len(part) < 2:  # no training sample
            continue
        histories.append(set(part) if ngram == 1 else set(zip(part, part[1:])))
    u = len(histories)
    keep = max(1, math.ceil(alpha * (u - 1)))
    indptr, neighbours, sims = [0], [], []
    for i in range(u):
        scored = []
        for j in range(u):
            inter = len(histories[i] & histories[j])
            if j != i and inter:
                scored.append((-(inter / len(histories[i] | histories[j])), j))
        scored.sort()
        for s, j in scored[:keep]:
            neighbours.append(j)
            sims.append(-s)
        indptr.append(len(neighbours))
    return np.array(indptr), np.array(neighbours, np.int64), np.array(sims)


@pytest.mark.parametrize("alpha", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("ngram", [1, 2])
def test_weak_positives_match_brute_force(small_split, alpha, ngram):
    indptr, features, _, _ = history_features(small_split, ngram)
    expected = brute_force(small_split, alpha, ngram)
    for block in (3, 2048):  # several row blocks, and one
        got = top_similar(indptr, features, alpha, block=block)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_allclose(got[2], expected[2], rtol=1e-12)
    assert len(expected[1]) > 0


def test_rows_map_to_users_and_their_longest_sample(small_split):
    _, _, sample_row, last_sample = history_features(small_split)
    h = small_split.valid_history
    with_samples = [r for r in range(len(h)) if len(h.row(r)) >= 2]
    assert len(last_sample) == len(with_samples)
    for row, r in enumerate(with_samples):
        part = h.row(r)
        sample = last_sample[row]
        assert sample_row[sample] == row
        # the longest sample predicts the last training item from everything before it
        assert small_split.train_targets[sample] == part[-1]
        inputs = small_split.train_inputs[sample]
        assert inputs[inputs != 0].tolist() == part[:-1][-small_split.max_len:].tolist()
    assert (np.diff(sample_row) >= 0).all() and sample_row.max() == len(with_samples) - 1


def test_cache_is_keyed_reused_and_written_atomically(small_split, tmp_path, monkeypatch):
    first = weak_positives(small_split, 0.3, 1, tmp_path)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("rcl-weak-")

    def fail(*args, **kwargs):
        raise AssertionError("recomputed instead of reading the cache")

    with monkeypatch.context() as m:
        m.setattr(rcl, "top_similar", fail)
        again = weak_positives(small_split, 0.3, 1, tmp_path)
    for name in ("indptr", "neighbours", "similarities", "cumulative"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    # Another setting or other data is another key, so another file.
    weak_positives(small_split, 0.05, 1, tmp_path)
    weak_positives(small_split, 0.3, 2, tmp_path)
    other = leave_one_out(make_synthetic(num_users=40, num_items=20, mean_length=6.0), 8)
    weak_positives(other, 0.3, 1, tmp_path)
    assert len(list(tmp_path.iterdir())) == 4
    # A damaged file is recomputed (and rewritten), never trusted.
    files[0].write_bytes(b"not an npz")
    repaired = weak_positives(small_split, 0.3, 1, tmp_path)
    assert torch.equal(repaired.neighbours, first.neighbours)
    # A crash while writing leaves no file behind.
    empty = tmp_path / "crash"

    def crash(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(np, "savez", crash)
        with pytest.raises(OSError, match="disk full"):
            weak_positives(small_split, 0.3, 1, empty)
    assert list(empty.iterdir()) == []


def test_draw_is_proportional_to_similarity(small_split):
    weak = weak_positives(small_split, 1.0)
    counts = weak.counts()
    row = int(torch.argmax(counts))  # the user with the most similar others
    samples = torch.nonzero(weak.sample_row == row).squeeze(1)
    index = samples[:1].repeat(40000)
    drawn, has, s = weak.sample(index, torch.Generator().manual_seed(0))
    assert has.all()
    lo, hi = int(weak.indptr[row]), int(weak.indptr[row + 1])
    expected = weak.similarities[lo:hi] / weak.similarities[lo:hi].sum()
    targets = weak.last_sample[weak.neighbours[lo:hi]]
    observed = (drawn[:, None] == targets[None, :]).double().mean(0)
    assert observed.sum() == pytest.approx(1.0)
    # 6 standard deviations of a binomial proportion: a generous bound for a fixed seed.
    bound = 6 * torch.sqrt(expected * (1 - expected) / len(index)) + 1e-9
    assert ((observed - expected).abs() <= bound).all()
    match = drawn[:, None] == targets[None, :]
    assert (match.sum(1) == 1).all()  # every draw is one of the row's weak positives
    assert torch.equal(s, weak.similarities[lo:hi][match.float().argmax(1)])


def test_a_user_without_similar_histories_keeps_itself():
    # Row 1 shares no feature with anyone.
    weak = WeakPositives(*top_similar(np.array([0, 2, 4, 5]), np.array([1, 2, 1, 3, 9]), 1.0),
                         sample_row=np.array([0, 1, 2]), last_sample=np.array([0, 1, 2]),
                         feature_indptr=np.array([0, 2, 4, 5]),
                         features=np.array([1, 2, 1, 3, 9]))
    drawn, has, s = weak.sample(torch.arange(3), torch.Generator().manual_seed(1))
    assert has.tolist() == [True, True, False]
    assert drawn.tolist() == [1, 0, 2] and s[2] == 0
    sim = weak.pair_similarity(torch.arange(3), torch.arange(3))
    expected = torch.tensor([[1, 1 / 3, 0], [1 / 3, 1, 0], [0, 0, 1]])
    torch.testing.assert_close(sim, expected)


def test_relative_bound_routes_the_gradient_to_the_strong_pair():
    strong = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    weak = torch.tensor([2.0, 1.0, 1.0, 5.0], requires_grad=True)
    has_strong = torch.tensor([True, True, False, True])
    has_weak = torch.tensor([True, True, True, False])
    loss = relative_contrastive_loss(strong, weak, has_strong, has_weak)
    # row 0: weak above strong -> 1 + 2; row 1: weak below -> bounded by strong, 2 + 2;
    # row 2: no strong -> weak alone; row 3: no weak -> strong alone.
    assert loss.item() == pytest.approx((3 + 4 + 1 + 4) / 4)
    loss.backward()
    assert weak.grad.tolist() == [0.25, 0.0, 0.25, 0.0]
    assert strong.grad.tolist() == [0.25, 0.5, 0.0, 0.25]
    # Per-row weights scale the bounded term only.
    weights = torch.tensor([2.0, 1.0, 1.0, 1.0])
    weighted = relative_contrastive_loss(strong.detach(), weak.detach(), has_strong, has_weak,
                                         weights)
    assert weighted.item() == pytest.approx((1 + 4 + 4 + 1 + 4) / 4)
    # A masked row cannot leak a non-finite value.
    inf = torch.tensor([math.inf, 1.0, 1.0, 1.0])
    assert torch.isfinite(relative_contrastive_loss(inf, inf.flip(0), torch.tensor(
        [False, True, True, True]), torch.tensor([False, True, True, False])))


def test_similarity_weights_reduce_to_info_nce_and_drop_zero_candidates():
    g = torch.Generator().manual_seed(0)
    z, zp = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g,
                                                                              dtype=torch.float64)
    ones = torch.ones(5, 10, dtype=torch.float64)
    plain = adaptive_info_nce(z, zp, None, normalize=False, positive_weight=1.0,
                              reduction="none")[:5]
    torch.testing.assert_close(similarity_weighted_info_nce(z, zp, ones), plain)
    weights = torch.rand(5, 10, generator=g, dtype=torch.float64) + 0.1
    weights[:, 3] = 0.0  # view 3 is no candidate of any row (except itself: excluded anyway)
    got = similarity_weighted_info_nce(z, zp, weights, temperature=0.5, normalize=True)
    views = torch.nn.functional.normalize(torch.cat([z, zp]), dim=1)
    for i in range(5):
        terms = [weights[i, c] * torch.exp(views[i] @ views[c] / 0.5) for c in range(10) if c != i]
        expected = -torch.log(weights[i, 5 + i] * torch.exp(views[i] @ views[5 + i] / 0.5)
                              / sum(terms))
        torch.testing.assert_close(got[i], expected)
    z_moved = z.clone()
    z_moved[3] *= 3.0
    changed = similarity_weighted_info_nce(z_moved, zp, weights)
    base = similarity_weighted_info_nce(z, zp, weights)
    keep = torch.tensor([0, 1, 2, 4])  # rows other than 3 ignore view 3 entirely
    torch.testing.assert_close(changed[keep], base[keep])
    with pytest.raises(ValueError, match="weights"):
        similarity_weighted_info_nce(z, zp, ones[:, :9])


def _objective(split, weighting="similarity", simthres=None):
    term = ContrastiveTerm(simthres, normalize=simthres is not None)
    return RCLObjective(weak_positives(split, 0.3), split.train_inputs,
                        split.same_target.size > 1, term, 0.1, weighting)


@pytest.mark.parametrize("weighting", ["similarity", "row", "none"])
def test_objective_trains_the_encoder(small_split, weighting):
    torch.manual_seed(0)
    model = SASRec(small_split.num_items, small_split.max_len, hidden=16, inner=32)
    simthres = StatisticalSimThres() if weighting != "similarity" else None
    objective = _objective(small_split, weighting, simthres)
    index = torch.arange(0, small_split.num_train, 3)
    positives = small_split.train_inputs[small_split.same_target.sample(index)]
    batch = Batch(small_split.train_inputs[index], small_split.train_targets[index], positives,
                  index)
    out = objective(model, batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.parts.values())
    torch.testing.assert_close(out.loss.detach(), out.parts["ce"] + 0.1 * out.parts["cl"])
    out.loss.backward()
    assert model.blocks[0].qkv.weight.grad.abs().sum() > 0
    assert out.views[0].shape == (len(index), 16)


def test_bad_arguments(small_split):
    with pytest.raises(ValueError, match="alpha"):
        weak_positives(small_split, 0.0)
    with pytest.raises(ValueError, match="ngram"):
        weak_positives(small_split, 0.1, 3)
    with pytest.raises(ValueError, match="weighting"):
        _objective(small_split, "pairs")
    with pytest.raises(ValueError, match="SimThres"):
        _objective(small_split, "similarity", StatisticalSimThres())
    with pytest.raises(ValueError, match="index"):
        _objective(small_split)(SASRec(small_split.num_items, 8, hidden=8, heads=1, inner=8),
                                Batch(small_split.train_inputs[:4], small_split.train_targets[:4]))
