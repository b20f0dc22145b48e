"""Published test metrics (full ranking, leave-one-out) to set beside reproduced ones.

Data, not measurements of this package: each entry names where its numbers were printed. HR@k
equals Recall@k with one target per user, so HR columns are stored as ``Recall@k``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    method: str  # this package's method name
    source: str  # a short tag, explained in SOURCES
    metrics: dict[str, float]


#: What each source tag means.
SOURCES = {
    "adaptiverec-paper": "AdaptiveRec paper (arXiv 2307.05469), Table 1, Amazon Beauty",
    "baselines": "Beauty HR@5 / HR@10 / NDCG@5 / NDCG@10 of SASRec, CL4SRec, DuoRec, ICLRec, "
                 "MCLRec and RCL as the project's protocol notes give them (the notes do not "
                 "name the paper whose table the row comes from)",
}


def _baseline(method: str, hr5: float, hr10: float, ndcg5: float, ndcg10: float) -> Published:
    return Published(method, "baselines", {"Recall@5": hr5, "Recall@10": hr10,
                                            "NDCG@5": ndcg5, "NDCG@10": ndcg10})


def _adaptiverec_table(method: str, ndcg5, ndcg10, mrr5, mrr10, recall5, recall10) -> Published:
    return Published(method, "adaptiverec-paper", {
        "NDCG@5": ndcg5, "NDCG@10": ndcg10, "MRR@5": mrr5, "MRR@10": mrr10,
        "Recall@5": recall5, "Recall@10": recall10})


#: dataset name (lower case, as the reproduction folders are named) -> entries.
PUBLISHED: dict[str, tuple[Published, ...]] = {
    "beauty": (
        _baseline("sasrec", .0365, .0627, .0236, .0281),
        _baseline("cl4srec", .0401, .0683, .0263, .0317),
        _baseline("duorec", .0546, .0845, .0352, .0443),
        _baseline("mclrec", .0581, .0871, .0352, .0446),
        _baseline("rcl", .0601, .0898, .0377, .0476),
        _adaptiverec_table("duorec", .0329, .0421, .0252, .0289, .0564, .0852),
        _adaptiverec_table("adaptiverec", .0335, .0427, .0257, .0295, .0574, .0857),
    ),
}


def published(dataset: str, method: str) -> list[Published]:
    """The entries for ``method`` on ``dataset`` (case-insensitive), possibly none."""
    return [p for p in PUBLISHED.get(dataset.lower(), ()) if p.method == method]
