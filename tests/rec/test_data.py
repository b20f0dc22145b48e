"""Readers, format detection, k-core filtering, the leave-one-out split and SameTargetIndex."""

from pathlib import Path

import numpy as np
import pytest
import torch

from adaptive_cl.rec.data import (
    DataFormatError,
    SameTargetIndex,
    SequenceData,
    detect_format,
    kcore_filter,
    leave_one_out,
    load_dataset,
    read_interaction_pairs,
    read_movielens_ratings,
    read_recbole_inter,
    read_user_sequences,
)

FIXTURES = Path(__file__).parent / "fixtures"
BEAUTY = Path("/work/shared/data/Beauty.txt")


def as_lists(data: SequenceData) -> list[list[int]]:
    return [s.tolist() for s in data.sequences]


def make_data(sequences: list[list[int]], num_items: int) -> SequenceData:
    return SequenceData(
        "hand",
        [np.array(s, np.int64) for s in sequences],
        num_items,
        [f"u{u}" for u in range(len(sequences))],
        ["<pad>", *(f"i{i}" for i in range(1, num_items + 1))],
    )


def assert_format_error(reader, name: str, line: int | None, problem: str) -> None:
    with pytest.raises(DataFormatError, match=problem) as info:
        reader(FIXTURES / name)
    message = str(info.value)
    assert name in message
    assert info.value.line == line
    if line is not None:
        assert f"line {line}" in message


# ----------------------------------------------------------------------------------- readers


def test_user_sequences_remap_in_order_of_first_appearance():
    data = read_user_sequences(FIXTURES / "seqs.txt")
    assert data.name == "seqs"
    assert as_lists(data) == [[1, 2, 3], [2, 3], [3, 1, 2, 4]]
    assert data.item_ids == ["<pad>", "7", "8", "9", "10"]
    assert data.user_ids == ["10", "11", "12"]
    assert (data.num_users, data.num_items, data.num_interactions) == (3, 4, 9)
    assert all(s.dtype == np.int64 for s in data.sequences)


def test_interaction_pairs_stable_sort_by_timestamp():
    data = read_interaction_pairs(FIXTURES / "pairs_ts.txt")
    assert data.user_ids == ["alice", "bob"]
    assert data.item_ids == ["<pad>", "apple", "pear", "fig"]
    # alice: apple@30, pear@10, fig@10 -> pear, fig (file order on the tie), apple
    assert as_lists(data) == [[2, 3, 1], [1, 2]]


def test_interaction_pairs_without_timestamps_keep_file_order():
    data = read_interaction_pairs(FIXTURES / "pairs_plain.txt")
    assert as_lists(data) == [[1, 2], [2]]


def test_movielens_ratings_sorted_by_time():
    data = read_movielens_ratings(FIXTURES / "ratings.dat")
    assert data.user_ids == ["1", "2"]
    assert data.item_ids == ["<pad>", "1193", "661", "914", "3408"]
    assert as_lists(data) == [[3, 1, 2], [1, 4]]
    assert data.name == "fixtures"  # a ratings file is named after its folder


def test_recbole_inter_finds_columns_by_name():
    data = read_recbole_inter(FIXTURES / "small.inter")
    assert data.user_ids == ["u1", "u2"]
    assert data.item_ids == ["<pad>", "i9", "i3", "i4"]
    assert as_lists(data) == [[2, 3, 1], [1]]
    unordered = read_recbole_inter(FIXTURES / "no_time.inter")  # item column first, no time
    assert unordered.user_ids == ["u1", "u2"]
    assert as_lists(unordered) == [[1, 2], [1]]


@pytest.mark.parametrize(
    "reader, name, line, problem",
    [
        (read_user_sequences, "seqs_bad_token.txt", 2, "'x' is not an integer"),
        (read_user_sequences, "seqs_no_items.txt", 2, "has no items"),
        (read_interaction_pairs, "pairs_bad_width.txt", 2, "expected 3 fields"),
        (read_interaction_pairs, "pairs_bad_ts.txt", 3, "timestamp 'soon'"),
        (read_interaction_pairs, "seqs.txt", 1, "got 4 fields"),
        (read_movielens_ratings, "ratings_bad.dat", 2, "got 3 fields"),
        (read_recbole_inter, "no_item.inter", 1, "item_id"),
        (read_recbole_inter, "bad_ts.inter", 3, "not finite"),
        (read_recbole_inter, "bad_width.inter", 3, "expected 3 tab-separated fields"),
        (read_user_sequences, "empty.txt", None, "empty"),
        (read_interaction_pairs, "empty.txt", None, "empty"),
        (read_movielens_ratings, "empty.txt", None, "empty"),
        (read_recbole_inter, "empty.txt", None, "empty"),
    ],
)
def test_malformed_lines_name_file_and_line(reader, name, line, problem):
    assert_format_error(reader, name, line, problem)


def test_duplicate_user_line_is_an_error(tmp_path):
    path = tmp_path / "dup.txt"
    path.write_text("1 5 6\n2 5\n1 7\n")
    with pytest.raises(DataFormatError, match="line 3: user 1 already had a line"):
        read_user_sequences(path)


# ------------------------------------------------------------------------ detection, loading


@pytest.mark.parametrize(
    "name, expected",
    [
        ("seqs.txt", "sequences"),
        ("pairs_ts.txt", "pairs"),
        ("pairs_plain.txt", "pairs"),
        ("ratings.dat", "movielens"),
        ("small.inter", "recbole"),
    ],
)
def test_detect_format(name, expected):
    assert detect_format(FIXTURES / name) == expected


def test_detect_format_sniffs_recbole_header_and_repeated_integer_users(tmp_path):
    inter = tmp_path / "interactions.tsv"
    inter.write_text((FIXTURES / "small.inter").read_text())
    assert detect_format(inter) == "recbole"
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1 5 100\n1 6 101\n2 5 99\n")
    assert detect_format(pairs) == "pairs"


def test_detect_format_refuses_to_guess():
    with pytest.raises(DataFormatError, match="ambiguous.txt: cannot tell the format"):
        detect_format(FIXTURES / "ambiguous.txt")
    with pytest.raises(DataFormatError, match="empty"):
        detect_format(FIXTURES / "empty.txt")


def test_detection_names_the_line_that_breaks_the_sequences_format(tmp_path):
    path = tmp_path / "seqs.txt"
    path.write_text("1 2 3 4\n2 3 4\n3 4 5 6 7\n4 2 3\n5 3 4 5\n6 2 x 4\n7 3 4\n")
    with pytest.raises(DataFormatError, match="'x' is not an integer id") as info:
        load_dataset(path)
    assert info.value.line == 6 and info.value.format_hint
    assert "seqs.txt, line 6" in str(info.value) and "format=" in str(info.value)


def test_a_byte_order_mark_is_not_part_of_the_first_id(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("1 5 6 7\n2 6 7\n".encode("utf-8-sig"))
    assert detect_format(path) == "sequences"
    assert read_user_sequences(path).user_ids == ["1", "2"]
    pairs = tmp_path / "bom_pairs.txt"
    pairs.write_bytes("u1 a\nu2 b\n".encode("utf-8-sig"))
    assert read_interaction_pairs(pairs).user_ids == ["u1", "u2"]


@pytest.mark.parametrize("header", ["user_id item_id timestamp", "user item time",
                                    "user_id:token item_id:token timestamp:float"])
def test_a_pairs_header_line_is_skipped(tmp_path, header):
    path = tmp_path / "pairs.txt"
    path.write_text(f"{header}\n1 5 100\n1 6 101\n2 5 99\n")
    assert detect_format(path) == "pairs"
    data = read_interaction_pairs(path)
    assert data.user_ids == ["1", "2"] and data.item_ids == ["<pad>", "5", "6"]
    assert as_lists(data) == [[1, 2], [1]]


def test_a_pairs_header_without_timestamps_is_skipped(tmp_path):
    path = tmp_path / "pairs.txt"
    for header in ("user item", "uid iid", "buyer product"):
        path.write_text(f"{header}\n1 5\n1 6\n2 5\n")
        assert read_interaction_pairs(path).user_ids == ["1", "2"], header
    # With string ids and unknown column names a first line is data.
    path.write_text("buyer product\nalice pear\n")
    assert read_interaction_pairs(path).user_ids == ["buyer", "alice"]


def test_a_kcore_filter_that_removes_everything_says_so(tmp_path):
    path = tmp_path / "sparse.txt"
    path.write_text("1 2 3 4\n2 5 6 7\n")
    with pytest.raises(ValueError, match="5-core filter .* removed all 6 interactions of 2 users"):
        load_dataset(path, format="sequences")


def test_load_dataset_detects_and_filters():
    assert as_lists(load_dataset(FIXTURES / "seqs.txt", kcore=None)) == [
        [1, 2, 3], [2, 3], [3, 1, 2, 4]
    ]
    # 2-core: item 10, seen once, goes; every user keeps at least two items.
    filtered = load_dataset(FIXTURES / "seqs.txt", format="sequences", kcore=2)
    assert filtered.item_ids == ["<pad>", "7", "8", "9"]
    assert as_lists(filtered) == [[1, 2, 3], [2, 3], [3, 1, 2]]


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"format": "csv"}, "format"), ({"kcore": 0}, "kcore"), ({"kcore": 2.5}, "kcore")],
)
def test_load_dataset_validates_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        load_dataset(FIXTURES / "seqs.txt", **kwargs)


def test_kcore_needs_several_passes_and_reindexes():
    # Item 3 (once) goes -> user 2 drops to one item and goes -> item 1 is left once and goes.
    data = make_data([[2, 4, 1], [2, 4], [1, 3]], num_items=4)
    filtered = kcore_filter(data, 2)
    assert as_lists(filtered) == [[1, 2], [1, 2]]
    assert filtered.num_items == 2
    assert filtered.item_ids == ["<pad>", "i2", "i4"]
    assert filtered.user_ids == ["u0", "u1"]
    assert as_lists(kcore_filter(data, 1)) == [[2, 4, 1], [2, 4], [1, 3]]
    assert kcore_filter(data, 4).num_users == 0
    with pytest.raises(ValueError, match="k must be"):
        kcore_filter(data, 0)


# ------------------------------------------------------------------------------------- split


def test_leave_one_out_hand_case():
    data = make_data([[1, 2, 3, 4, 5, 6], [7, 8], [2, 3, 4]], num_items=8)
    split = leave_one_out(data, max_len=2)
    assert split.train_inputs.tolist() == [[0, 1], [1, 2], [2, 3]]  # left-padded, truncated
    assert split.train_targets.tolist() == [2, 3, 4]
    assert split.train_users.tolist() == [0, 0, 0]
    assert split.eval_users.tolist() == [0, 2]  # the two-item user is dropped
    assert split.valid_inputs.tolist() == [[3, 4], [0, 2]]
    assert split.valid_targets.tolist() == [5, 3]
    assert split.test_inputs.tolist() == [[4, 5], [2, 3]]
    assert split.test_targets.tolist() == [6, 4]
    assert [split.valid_history.row(r).tolist() for r in range(2)] == [[1, 2, 3, 4], [2]]
    assert [split.test_history.row(r).tolist() for r in range(2)] == [[1, 2, 3, 4, 5], [2, 3]]
    for t in (split.train_inputs, split.train_targets, split.valid_inputs, split.test_targets):
        assert t.dtype == torch.int64

    wide = leave_one_out(data, max_len=5)
    assert wide.train_inputs.tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 1, 2], [0, 0, 1, 2, 3]]
    assert wide.test_inputs.tolist() == [[1, 2, 3, 4, 5], [0, 0, 0, 2, 3]]


def test_history_mask_rows_and_slices_agree():
    data = make_data([[1, 2, 3, 4, 5, 6], [2, 3, 4], [6, 6, 1, 2]], num_items=8)
    split = leave_one_out(data)
    dense = split.history_mask("test", slice(0, 3))
    assert dense.shape == (3, 9)
    assert dense[0].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]
    assert dense[2].nonzero().flatten().tolist() == [1, 6]
    picked = split.history_mask("test", torch.tensor([2, 0]))
    assert torch.equal(picked, dense[[2, 0]])
    assert split.history_mask("valid", slice(1, 2))[0].nonzero().flatten().tolist() == [2]
    with pytest.raises(ValueError, match="which"):
        split.history_mask("train", slice(0, 1))


def test_leave_one_out_validates():
    data = make_data([[1, 2, 3]], num_items=3)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="max_len"):
            leave_one_out(data, max_len=bad)
    with pytest.raises(ValueError, match="3 interactions"):
        leave_one_out(make_data([[1, 2]], num_items=2))


@pytest.mark.skipif(not BEAUTY.exists(), reason="Beauty.txt is not available")
def test_beauty_counts():
    data = load_dataset(BEAUTY)
    assert (data.num_users, data.num_items, data.num_interactions) == (22363, 12101, 198502)
    split = leave_one_out(data, max_len=50)
    assert split.train_inputs.shape == (131413, 50)
    assert split.valid_inputs.shape == split.test_inputs.shape == (22363, 50)
    assert len(split.valid_targets) == len(split.test_targets) == 22363
    assert (split.train_inputs[:, -1] > 0).all()  # most recent item in the last column
    assert int(split.train_targets.min()) >= 1 and int(split.test_targets.max()) <= 12101
    assert len(split.valid_history.items) == 198502 - 2 * 22363


# --------------------------------------------------------------------------- SameTargetIndex


def test_same_target_partner_shares_target_and_differs():
    targets = torch.tensor([5, 3, 5, 5, 3, 7])
    index = SameTargetIndex(targets)
    idx = torch.arange(6).repeat(500)
    partner = index.sample(idx, torch.Generator().manual_seed(0))
    assert torch.equal(targets[partner], targets[idx])
    assert (partner[idx != 5] != idx[idx != 5]).all()
    assert (partner[idx == 5] == 5).all()  # the only sample with target 7
    assert (partner[idx == 1] == 4).all()
    # Both other members of the target-5 group are drawn, about equally often.
    share = (partner[idx == 0] == 2).double().mean().item()
    assert 0.4 < share < 0.6


def test_same_target_is_deterministic_and_movable():
    targets = torch.randint(1, 50, (2000,), generator=torch.Generator().manual_seed(1))
    index = SameTargetIndex(targets).to("cpu")
    idx = torch.randperm(2000, generator=torch.Generator().manual_seed(2))[:512]
    first = index.sample(idx, torch.Generator().manual_seed(3))
    again = index.sample(idx, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert torch.equal(targets[first], targets[idx])
    counts = torch.bincount(targets)
    assert ((first != idx) | (counts[targets[idx]] == 1)).all()
