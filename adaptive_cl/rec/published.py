"""Published test metrics (full ranking, leave-one-out) to set beside reproduced ones.

Data, not measurements of this package: each entry names where its numbers were printed. HR@k
equals Recall@k with one target per user, so HR columns are stored as ``Recall@k``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    method: str  # the reproduction's setup name (reproduce.SETUPS)
    source: str  # a short tag, explained in SOURCES
    metrics: dict[str, float]


#: What each source tag means.
SOURCES = {
    "adaptiverec-paper": "AdaptiveRec paper (arXiv 2307.05469), Table 1, Amazon Beauty",
    "rcl-paper": "RCL paper (arXiv 2504.19178), Table 2, Beauty (its RCL column is the 2-gram "
                 "variant, Section 4.2)",
    "mclrec-paper": "MCLRec paper (SIGIR 2023, arXiv 2304.07763), Table 3, Beauty (RCL's Table 2 "
                    "quotes MCLRec with HR@10 .0861)",
    "notes": "DuoRec's Beauty row as the project's protocol notes give it; the paper it comes "
             "from is not recorded (neither the AdaptiveRec, RCL nor MCLRec table has it)",
}


def _hr_ndcg(method: str, source: str, hr5: float, hr10: float, ndcg5: float,
             ndcg10: float) -> Published:
    return Published(method, source, {"Recall@5": hr5, "Recall@10": hr10,
                                      "NDCG@5": ndcg5, "NDCG@10": ndcg10})


def _adaptiverec_table(method: str, ndcg5, ndcg10, mrr5, mrr10, recall5, recall10) -> Published:
    return Published(method, "adaptiverec-paper", {
        "NDCG@5": ndcg5, "NDCG@10": ndcg10, "MRR@5": mrr5, "MRR@10": mrr10,
        "Recall@5": recall5, "Recall@10": recall10})


#: dataset name (lower case, as the reproduction folders are named) -> entries.
PUBLISHED: dict[str, tuple[Published, ...]] = {
    "beauty": (
        _hr_ndcg("sasrec", "rcl-paper", .0365, .0627, .0236, .0281),
        _hr_ndcg("cl4srec", "rcl-paper", .0401, .0683, .0263, .0317),
        _hr_ndcg("duorec", "notes", .0546, .0845, .0352, .0443),
        _hr_ndcg("mclrec", "mclrec-paper", .0581, .0871, .0352, .0446),
        _hr_ndcg("rcl", "rcl-paper", .0601, .0898, .0377, .0476),
        _adaptiverec_table("duorec-paper", .0329, .0421, .0252, .0289, .0564, .0852),
        _adaptiverec_table("adaptiverec", .0335, .0427, .0257, .0295, .0574, .0857),
    ),
}


def published(dataset: str, method: str) -> list[Published]:
    """The entries for ``method`` on ``dataset`` (case-insensitive), possibly none."""
    return [p for p in PUBLISHED.get(dataset.lower(), ()) if p.method == method]
