"""CL4SRec augmentations: invariants, no mutation, distinct operations, determinism."""

import pytest
import torch

from adaptive_cl.rec.augment import Augmenter

NUM_ITEMS = 100


def batch(seed: int = 0, b: int = 64, width: int = 20) -> torch.Tensor:
    """Left-padded rows of distinct items with lengths 1..width."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (b,), generator=g)
    items = torch.stack([torch.randperm(NUM_ITEMS, generator=g)[:width] + 1 for _ in range(b)])
    col = torch.arange(width)
    return torch.where(col >= width - lengths[:, None], items, 0)


def rows(x: torch.Tensor):
    for row in x:
        yield row[row != 0].tolist()


def contiguous(sub: list, seq: list) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_crop_keeps_a_contiguous_subsequence_of_the_right_length():
    x = batch()
    out = Augmenter(NUM_ITEMS, crop=0.6).crop(x, torch.Generator().manual_seed(1))
    for src, dst in zip(rows(x), rows(out)):
        assert len(dst) == max(1, int(0.6 * len(src)))
        assert contiguous(dst, src)
    real = out != 0  # still left-padded: once real, real to the end
    assert (real.long().diff(dim=1) >= 0).all()


def test_mask_replaces_the_right_count_and_keeps_the_rest():
    x = batch()
    aug = Augmenter(NUM_ITEMS, mask=0.3)
    out = aug.mask(x, torch.Generator().manual_seed(1))
    assert torch.equal(out == 0, x == 0)
    masked = out == aug.mask_token
    assert torch.equal(masked.sum(1), (0.3 * (x != 0).sum(1).double()).floor().long())
    assert torch.equal(out[~masked], x[~masked])


def test_reorder_permutes_one_contiguous_span():
    x = batch()
    out = Augmenter(NUM_ITEMS, reorder=0.6).reorder(x, torch.Generator().manual_seed(1))
    assert torch.equal(out == 0, x == 0)
    for src, dst in zip(rows(x), rows(out)):
        assert sorted(src) == sorted(dst)
        changed = [i for i, (a, b) in enumerate(zip(src, dst)) if a != b]
        if changed:
            assert changed[-1] - changed[0] + 1 <= int(0.6 * len(src))
    assert not torch.equal(out, x)


def test_source_is_not_mutated_and_views_are_deterministic_per_seed():
    x = batch()
    before = x.clone()
    aug = Augmenter(NUM_ITEMS)
    a1, a2, ops_a = aug.two_views(x, torch.Generator().manual_seed(7))
    b1, b2, ops_b = aug.two_views(x, torch.Generator().manual_seed(7))
    assert torch.equal(x, before)
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(ops_a, ops_b)
    c1, _, _ = aug.two_views(x, torch.Generator().manual_seed(8))
    assert not torch.equal(a1, c1)


def test_two_views_use_two_distinct_operations():
    x = batch(b=300)
    aug = Augmenter(NUM_ITEMS)
    v1, v2, ops = aug.two_views(x, torch.Generator().manual_seed(3))
    assert (ops[:, 0] != ops[:, 1]).all()
    assert set(ops.flatten().tolist()) == {0, 1, 2}
    for view, col in ((v1, 0), (v2, 1)):
        masked_rows = (view == aug.mask_token).any(1)
        assert not masked_rows[ops[:, col] != 1].any()  # only "mask" produces mask tokens
        cropped = (view != 0).sum(1) < (x != 0).sum(1)
        assert not cropped[ops[:, col] != 0].any()  # only "crop" shortens


def test_bad_rates_rejected():
    with pytest.raises(ValueError, match="crop"):
        Augmenter(NUM_ITEMS, crop=1.5)
    with pytest.raises(ValueError, match="num_items"):
        Augmenter(0)
