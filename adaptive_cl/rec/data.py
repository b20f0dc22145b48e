"""Interaction data: readers, iterative k-core filtering and the leave-one-out split.

Every reader returns a :class:`SequenceData` whose items are dense ids ``1..num_items`` in order
of first appearance in the file (``0`` is the padding id and never an item), so models can size
their embedding tables from ``num_items`` alone. Malformed input raises :class:`DataFormatError`
naming the file, the 1-based line and the problem, because a silently skipped line changes
every downstream number.

The split follows the DuoRec / RecBole protocol: per user the last item is the test target, the
second-to-last the validation target, and every prefix of the remaining training part predicts
its next item. All tensors are built with vectorised numpy, not per-sample Python loops.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORMATS = ("sequences", "pairs", "movielens", "recbole")

#: RecBole field names (the part before ``:type`` in an ``.inter`` header) this module reads.
_RECBOLE_FIELDS = {"user": "user_id", "item": "item_id", "timestamp": "timestamp"}


class DataFormatError(ValueError):
    """A malformed input file; the message names the file, the 1-based line and the problem.

    ``format_hint`` is True when naming the format explicitly may help (the format was guessed);
    the message then says so (a command line says which flag does it)."""

    def __init__(self, path: str | Path, line: int | None, problem: str, *,
                 format_hint: bool = False) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        self.format_hint = format_hint
        hint = f"; pass the format explicitly, format= one of {FORMATS}" if format_hint else ""
        super().__init__(f"{self.where}: {problem}{hint}")

    @property
    def where(self) -> str:
        return f"{self.path}, line {self.line}" if self.line is not None else self.path


@dataclass
class SequenceData:
    """Chronological item sequences of every user, items re-indexed to ``1..num_items``."""

    name: str
    sequences: list[np.ndarray]
    num_items: int
    user_ids: list[str]
    item_ids: list[str]

    def __post_init__(self) -> None:
        if len(self.user_ids) != len(self.sequences):
            raise ValueError(
                f"user_ids has {len(self.user_ids)} entries for {len(self.sequences)} sequences"
            )
        if len(self.item_ids) != self.num_items + 1:
            raise ValueError(
                f"item_ids must hold num_items + 1 = {self.num_items + 1} entries "
                f"(index 0 is padding), got {len(self.item_ids)}"
            )

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)


# ----------------------------------------------------------------------------------- readers


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of every non-blank line; raises on an empty file."""
    seen = False
    # surrogateescape: ids are opaque tokens, so undecodable bytes must survive, not abort.
    # utf-8-sig: a byte-order mark (as some editors write) is not part of the first token.
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                seen = True
                yield number, line
    if not seen:
        raise DataFormatError(path, None, "the file is empty")


def _parse_timestamp(path: Path, number: int, token: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise DataFormatError(path, number, f"timestamp {token!r} is not a number") from None
    if not math.isfinite(value):
        raise DataFormatError(path, number, f"timestamp {token!r} is not finite")
    return value


def _from_events(
    name: str,
    users: list[int],
    items: list[int],
    timestamps: list[float] | None,
    user_ids: list[str],
    item_ids: list[str],
) -> SequenceData:
    """Group (user, item[, time]) events into per-user sequences, stable-sorted by time."""
    u = np.asarray(users, dtype=np.int64)
    i = np.asarray(items, dtype=np.int64)
    # Both sorts are stable: equal timestamps, and every event without one, keep file order.
    if timestamps is None:
        order = np.argsort(u, kind="stable")
    else:
        order = np.lexsort((np.asarray(timestamps), u))
    counts = np.bincount(u, minlength=len(user_ids))
    sequences = np.split(i[order], np.cumsum(counts)[:-1])
    return SequenceData(name, sequences, len(item_ids), user_ids, ["<pad>", *item_ids])


class _Events:
    """(user, item[, time]) events as read, ids remapped to dense indices in order of first
    appearance (users from 0, items from 1: 0 is padding); shared by the event-file readers."""

    def __init__(self) -> None:
        self.user_index: dict[str, int] = {}
        self.item_index: dict[str, int] = {}
        self.users: list[int] = []
        self.items: list[int] = []
        self.timestamps: list[float] = []

    def add(self, user: str, item: str, timestamp: float | None = None) -> None:
        self.users.append(self.user_index.setdefault(user, len(self.user_index)))
        self.items.append(self.item_index.setdefault(item, len(self.item_index) + 1))
        if timestamp is not None:
            self.timestamps.append(timestamp)

    def build(self, name: str) -> SequenceData:
        return _from_events(name, self.users, self.items, self.timestamps or None,
                            list(self.user_index), list(self.item_index))


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def read_user_sequences(path: str | Path) -> SequenceData:
    """Read ``user item item ...`` lines (the SASRec / ICLRec files such as ``Beauty.txt``).

    Every token must be an integer (ids compare by value, so ``007`` and ``7`` are one item);
    each user appears on one line with at least one item, items in chronological order.
    """
    path = Path(path)
    user_index: dict[int, int] = {}
    item_index: dict[int, int] = {}
    sequences: list[np.ndarray] = []
    for number, line in _lines(path):
        tokens = line.split()
        try:
            values = [int(t) for t in tokens]
        except ValueError:
            bad = next(t for t in tokens if not _is_int(t))
            raise DataFormatError(path, number, f"{bad!r} is not an integer id") from None
        if len(values) < 2:
            raise DataFormatError(path, number, f"user {tokens[0]} has no items")
        if values[0] in user_index:
            raise DataFormatError(path, number, f"user {tokens[0]} already had a line")
        user_index[values[0]] = len(user_index)
        sequences.append(
            np.array([item_index.setdefault(v, len(item_index) + 1) for v in values[1:]], np.int64)
        )
    return SequenceData(
        path.stem, sequences, len(item_index), [str(u) for u in user_index],
        ["<pad>", *(str(i) for i in item_index)],
    )


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


_USER_COLUMNS = ("user", "user_id", "userid", "uid")
_ITEM_COLUMNS = ("item", "item_id", "itemid", "iid")


def _is_pairs_header(fields: list[str], following: list[str] | None) -> bool:
    """Whether the first line of a pairs file names its columns rather than holding an event:
    it names a user and an item column (``user_id item_id``, RecBole-style ``user_id:token``),
    or its timestamp or its ids are not numbers where the next line's are."""
    names = [f.split(":", 1)[0].lower() for f in fields]
    if len(names) >= 2 and names[0] in _USER_COLUMNS and names[1] in _ITEM_COLUMNS:
        return True
    if following is None or len(following) != len(fields):
        return False
    if len(fields) == 3 and not _is_number(fields[2]) and _is_number(following[2]):
        return True
    return not any(_is_int(f) for f in fields[:2]) and all(_is_int(f) for f in following[:2])


def read_interaction_pairs(path: str | Path) -> SequenceData:
    """Read whitespace-separated ``user item [timestamp]`` lines, ids being arbitrary tokens.

    Either every line has a timestamp or none has; with timestamps each user's items are
    stable-sorted by time, without them they keep file order. A first line that names the
    columns (see ``_is_pairs_header``) is skipped.
    """
    path = Path(path)
    events = _Events()
    width = 0
    lines = list(_lines(path))
    if len(lines) > 1 and _is_pairs_header(lines[0][1].split(), lines[1][1].split()):
        lines = lines[1:]
    for number, line in lines:
        fields = line.split()
        if not width:
            width = len(fields)
            if width not in (2, 3):
                raise DataFormatError(
                    path, number, f"expected 'user item [timestamp]', got {len(fields)} fields"
                )
        elif len(fields) != width:
            raise DataFormatError(
                path, number, f"expected {width} fields like the first line, got {len(fields)}"
            )
        timestamp = _parse_timestamp(path, number, fields[2]) if width == 3 else None
        events.add(fields[0], fields[1], timestamp)
    return events.build(path.stem)


def read_movielens_ratings(path: str | Path) -> SequenceData:
    """Read MovieLens ``ratings.dat`` (``user::item::rating::timestamp``), sorted by time.

    Every rating counts as an interaction, as in DuoRec's and RecBole's ML-1M set-up; the
    rating value itself is not used. A file called ``ratings`` takes its folder's name.
    """
    path = Path(path)
    events = _Events()
    for number, line in _lines(path):
        fields = line.rstrip("\r\n").split("::")
        if len(fields) != 4:
            raise DataFormatError(
                path, number, f"expected 'user::item::rating::timestamp', got {len(fields)} fields"
            )
        events.add(fields[0].strip(), fields[1].strip(), _parse_timestamp(path, number, fields[3]))
    name = path.parent.name if path.stem == "ratings" and path.parent.name else path.stem
    return events.build(name)


def read_recbole_inter(path: str | Path) -> SequenceData:
    """Read a RecBole atomic ``.inter`` file: tab-separated, typed header ``name:type``.

    Columns are found by field name (``user_id``, ``item_id``, optional ``timestamp``); other
    columns are ignored. With a timestamp column each user's items are stable-sorted by it.
    """
    path = Path(path)
    lines = _lines(path)
    header_number, header = next(lines)
    names = [field.split(":", 1)[0].strip() for field in header.rstrip("\r\n").split("\t")]
    columns = {role: names.index(field) for role, field in _RECBOLE_FIELDS.items() if field in names}
    missing = [_RECBOLE_FIELDS[r] for r in ("user", "item") if r not in columns]
    if missing:
        raise DataFormatError(
            path, header_number,
            f"header lacks the column(s) {', '.join(missing)} (found {', '.join(names)})",
        )
    user_col, item_col, time_col = columns["user"], columns["item"], columns.get("timestamp")
    events = _Events()
    for number, line in lines:
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != len(names):
            raise DataFormatError(
                path, number, f"expected {len(names)} tab-separated fields, got {len(fields)}"
            )
        timestamp = None if time_col is None else _parse_timestamp(path, number, fields[time_col])
        events.add(fields[user_col], fields[item_col], timestamp)
    if not events.users:
        raise DataFormatError(path, header_number, "header but no interactions")
    return events.build(path.stem)


_READERS: dict[str, Callable[[str | Path], SequenceData]] = {
    "sequences": read_user_sequences,
    "pairs": read_interaction_pairs,
    "movielens": read_movielens_ratings,
    "recbole": read_recbole_inter,
}

_SNIFF_LINES = 50


def detect_format(path: str | Path) -> str:
    """Guess the format from the extension, a RecBole header, ``::`` separators or the shape
    of the first lines.

    Integer lines of varying or more than three tokens are user sequences; lines of a constant
    two or three fields are interaction pairs when a user repeats (a sequences file names each
    user once) or a token is not an integer (sequences files are all-integer). Anything else is
    ambiguous and raises, asking for an explicit ``format``.
    """
    path = Path(path)
    if path.suffix == ".inter":
        return "recbole"
    head: list[tuple[int, str]] = []
    for number, line in _lines(path):
        head.append((number, line))
        if len(head) == _SNIFF_LINES:
            break
    first = head[0][1].rstrip("\r\n")
    if "\t" in first and any(
        f.split(":", 1)[0].strip() == _RECBOLE_FIELDS["user"] and ":" in f
        for f in first.split("\t")
    ):
        return "recbole"
    if "::" in first:
        return "movielens"
    rows = [(number, line.split()) for number, line in head]
    widths = {len(fields) for _, fields in rows}
    if len(widths) > 1 or max(widths) > 3:
        # Only user sequences have lines of varying (or more than three) fields: say what breaks
        # that reading, on which line, rather than "cannot tell".
        for number, fields in rows:
            bad = next((t for t in fields if not _is_int(t)), None)
            if bad is not None:
                raise DataFormatError(
                    path, number,
                    f"{bad!r} is not an integer id, but the lines have varying numbers of fields "
                    "as in the 'sequences' format (user item item ..., integer ids)",
                    format_hint=True,
                )
            if len(fields) < 2:
                raise DataFormatError(path, number, f"user {fields[0]} has no items",
                                      format_hint=True)
        return "sequences"
    if widths <= {2, 3}:
        users = [fields[0] for _, fields in rows]
        all_ints = all(_is_int(t) for _, fields in rows for t in fields)
        if len(set(users)) < len(users) or not all_ints:
            return "pairs"
    raise DataFormatError(
        path, None, f"cannot tell the format from the first {len(head)} lines",
        format_hint=True,
    )


# ----------------------------------------------------------------------------------- k-core


def kcore_filter(data: SequenceData, k: int) -> SequenceData:
    """Keep users and items with at least ``k`` interactions, repeating until both hold.

    One pass is not enough: dropping a sparse item can push a user below ``k`` and vice versa.
    Repeated interactions count once each (as RecBole counts rows). Surviving items keep their
    relative order and are re-indexed to ``1..n``; users without interactions are dropped.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    lengths = np.fromiter((len(s) for s in data.sequences), np.int64, len(data.sequences))
    users = np.repeat(np.arange(len(lengths)), lengths)
    items = np.concatenate(data.sequences) if data.sequences else np.zeros(0, np.int64)
    while True:
        keep = (np.bincount(users, minlength=len(lengths))[users] >= k) & (
            np.bincount(items, minlength=data.num_items + 1)[items] >= k
        )
        if keep.all():
            break
        users, items = users[keep], items[keep]
    kept_items = np.unique(items)
    new_id = np.zeros(data.num_items + 1, np.int64)
    new_id[kept_items] = np.arange(1, len(kept_items) + 1)
    counts = np.bincount(users, minlength=len(lengths))
    kept_users = np.flatnonzero(counts)
    sequences = np.split(new_id[items], np.cumsum(counts[kept_users])[:-1]) if len(items) else []
    return SequenceData(
        data.name,
        sequences,
        len(kept_items),
        [data.user_ids[u] for u in kept_users],
        ["<pad>", *(data.item_ids[i] for i in kept_items)],
    )


def load_dataset(path: str | Path, format: str = "auto", kcore: int | None = 5) -> SequenceData:
    """Read ``path`` (format detected unless given) and apply iterative ``kcore`` filtering.

    ``kcore=None`` keeps every interaction; the protocol's default is 5.
    """
    if format != "auto" and format not in _READERS:
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    if kcore is not None and (isinstance(kcore, bool) or not isinstance(kcore, int) or kcore < 1):
        raise ValueError(f"kcore must be None or an integer >= 1, got {kcore!r}")
    data = _READERS[detect_format(path) if format == "auto" else format](path)
    if kcore is None:
        return data
    kept = kcore_filter(data, kcore)
    if not kept.num_users:
        raise ValueError(
            f"{path}: the {kcore}-core filter (keep users and items with >= {kcore} "
            f"interactions, repeated until both hold) removed all {data.num_interactions} "
            f"interactions of {data.num_users} users and {data.num_items} items"
        )
    return kept


# ------------------------------------------------------------------------------------- split


@dataclass
class ItemHistory:
    """Ragged per-row item lists in CSR form: row ``r`` saw ``items[indptr[r]:indptr[r + 1]]``.

    ``indptr`` stays on the host so that a contiguous block of rows is located without reading
    device memory; ``items`` and ``rows`` (the row of every entry) may live on any device.
    """

    indptr: np.ndarray
    items: torch.Tensor
    rows: torch.Tensor

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def to(self, device: torch.device | str) -> ItemHistory:
        return ItemHistory(self.indptr, self.items.to(device), self.rows.to(device))

    def row(self, r: int) -> torch.Tensor:
        return self.items[self.indptr[r] : self.indptr[r + 1]]

    def mask(
        self, rows: slice | torch.Tensor, num_columns: int, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Boolean ``(len(rows), num_columns)`` mask of each row's items.

        A ``slice`` of consecutive rows is built where ``items`` lives (then moved to
        ``device``) without a host sync; a tensor of arbitrary row indices is resolved on the
        host, so pass it on the CPU to avoid a device sync.
        """
        device = self.items.device if device is None else torch.device(device)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step != 1:
                raise ValueError("rows must be a contiguous slice (step 1) or a tensor")
            lo, hi = int(self.indptr[start]), int(self.indptr[max(start, stop)])
            out = torch.zeros(max(stop - start, 0), num_columns, dtype=torch.bool,
                              device=self.items.device)
            out[self.rows[lo:hi] - start, self.items[lo:hi]] = True
            return out.to(device)
        index = rows.to("cpu", torch.int64).numpy()
        starts, stops = self.indptr[index], self.indptr[index + 1]
        counts = stops - starts
        entry = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        out = torch.zeros(len(index), num_columns, dtype=torch.bool)
        items = self.items.cpu()[torch.from_numpy(entry)]
        out[torch.from_numpy(np.repeat(np.arange(len(index)), counts)), items] = True
        return out.to(device)


class SameTargetIndex:
    """For DuoRec's supervised positives: for each training sample, another training sample
    with the same target item.

    Samples are grouped by target with one stable sort; each sample stores where its group
    starts in the sorted order, the group size and its own position in the group, so drawing a
    partner is pure tensor arithmetic on any device.
    """

    def __init__(self, targets: torch.Tensor) -> None:
        targets = targets.reshape(-1).to(torch.int64)
        order = torch.argsort(targets, stable=True)
        sorted_targets = targets[order]
        _, group_sizes = torch.unique_consecutive(sorted_targets, return_counts=True)
        group_starts = torch.cumsum(group_sizes, 0) - group_sizes
        group_of_sorted = torch.repeat_interleave(
            torch.arange(len(group_sizes), device=targets.device), group_sizes
        )
        start = torch.empty_like(order)
        size = torch.empty_like(order)
        position = torch.empty_like(order)
        start[order] = group_starts[group_of_sorted]
        size[order] = group_sizes[group_of_sorted]
        position[order] = torch.arange(len(order), device=targets.device) - start[order]
        self._set(order, start, size, position)

    def _set(self, order, start, size, position) -> None:
        self.order, self.start, self.size, self.position = order, start, size, position

    def __len__(self) -> int:
        return len(self.order)

    def to(self, device: torch.device | str) -> SameTargetIndex:
        moved = object.__new__(SameTargetIndex)
        moved._set(*(t.to(device) for t in (self.order, self.start, self.size, self.position)))
        return moved

    def sample(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A uniformly random *other* sample with the same target for each index in ``idx``
        (the sample itself when its target is unique); runs on ``idx``'s device, no sync."""
        idx = idx.to(self.order.device)
        size, position = self.size[idx], self.position[idx]
        others = (size - 1).clamp_min(1)
        u = torch.rand(idx.shape, generator=generator, device=idx.device)
        # float rounding can hit ``others`` exactly; clamp keeps the draw in range.
        offset = torch.minimum((u * others).long(), others - 1)
        offset = offset + (offset >= position)  # skip the sample's own slot
        offset = torch.where(size > 1, offset, position)
        return self.order[self.start[idx] + offset]


@dataclass
class LeaveOneOutSplit:
    """Leave-one-out tensors; every input row is left-padded with 0, most recent item last.

    ``train_users`` and ``eval_users`` index ``SequenceData.sequences``; row ``r`` of the
    validation and test tensors (and histories) belongs to user ``eval_users[r]``. The
    histories hold each user's full past (not truncated to ``max_len``): the training part
    for validation, the training part plus the validation target for test.
    """

    num_items: int
    max_len: int
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    train_users: torch.Tensor
    valid_inputs: torch.Tensor
    valid_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    valid_history: ItemHistory
    test_history: ItemHistory
    same_target: SameTargetIndex
    eval_users: torch.Tensor

    @property
    def num_train(self) -> int:
        return len(self.train_targets)

    def fingerprint(self) -> str:
        """A hash of every tensor training and evaluation read (and so of the data file, its
        format, the k-core filter and ``max_len``): checkpoints store it, so a resumed run can
        tell that it continues on the same data."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{self.num_items} {self.max_len}".encode())
        for t in (self.train_inputs, self.train_targets, self.valid_inputs, self.valid_targets,
                  self.test_inputs, self.test_targets):
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @property
    def num_eval_users(self) -> int:
        return len(self.eval_users)

    def history(self, which: str) -> ItemHistory:
        if which not in ("valid", "test"):
            raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
        return self.valid_history if which == "valid" else self.test_history

    def eval_tensors(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the ``'valid'`` or ``'test'`` rows."""
        self.history(which)  # validates ``which``
        if which == "valid":
            return self.valid_inputs, self.valid_targets
        return self.test_inputs, self.test_targets

    def history_mask(
        self, which: str, users: torch.Tensor | slice, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Dense boolean ``(len(users), num_items + 1)`` mask of the items each evaluation row
        (``users`` indexes the ``which`` rows) saw before its target; see ``ItemHistory.mask``."""
        return self.history(which).mask(users, self.num_items + 1, device)


def _windows(flat: np.ndarray, first: np.ndarray, end: np.ndarray, max_len: int) -> torch.Tensor:
    """Rows ``flat[max(first, end - max_len):end]``, left-padded with 0 to ``max_len``."""
    positions = end[:, None] - max_len + np.arange(max_len)
    inside = positions >= first[:, None]
    return torch.from_numpy(np.where(inside, flat[np.maximum(positions, 0)], 0))


def _history(flat: np.ndarray, first: np.ndarray, counts: np.ndarray) -> ItemHistory:
    indptr = np.concatenate([[0], np.cumsum(counts)])
    entry = np.repeat(first - indptr[:-1], counts) + np.arange(indptr[-1])
    rows = np.repeat(np.arange(len(counts)), counts)
    return ItemHistory(indptr, torch.from_numpy(flat[entry]), torch.from_numpy(rows))


def leave_one_out(data: SequenceData, max_len: int = 50) -> LeaveOneOutSplit:
    """Split every user with ``n >= 3`` items (shorter users are dropped): last item = test
    target, second-to-last = validation target, first ``n - 2`` = training part, each of whose
    prefixes predicts its next item (``n - 3`` samples, inputs the last ``<= max_len`` items)."""
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be an integer >= 1, got {max_len!r}")
    lengths = np.fromiter((len(s) for s in data.sequences), np.int64, len(data.sequences))
    users = np.flatnonzero(lengths >= 3)
    if not len(users):
        raise ValueError(f"{data.name}: no user has the 3 interactions a leave-one-out split needs")
    n = lengths[users]
    flat = np.concatenate([data.sequences[u] for u in users]).astype(np.int64, copy=False)
    first = np.concatenate([[0], np.cumsum(n)[:-1]])

    # Training sample j of a user targets its training-part position j + 1, j = 0..n-4.
    per_user = n - 3
    sample_user = np.repeat(np.arange(len(users)), per_user)
    sample_end = first[sample_user] + 1 + (
        np.arange(per_user.sum()) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    )
    train_targets = torch.from_numpy(flat[sample_end])
    valid_end, test_end = first + n - 2, first + n - 1
    return LeaveOneOutSplit(
        num_items=data.num_items,
        max_len=max_len,
        train_inputs=_windows(flat, first[sample_user], sample_end, max_len),
        train_targets=train_targets,
        train_users=torch.from_numpy(users[sample_user]),
        valid_inputs=_windows(flat, first, valid_end, max_len),
        valid_targets=torch.from_numpy(flat[valid_end]),
        test_inputs=_windows(flat, first, test_end, max_len),
        test_targets=torch.from_numpy(flat[test_end]),
        valid_history=_history(flat, first, n - 2),
        test_history=_history(flat, first, n - 1),
        same_target=SameTargetIndex(train_targets),
        eval_users=torch.from_numpy(users),
    )
