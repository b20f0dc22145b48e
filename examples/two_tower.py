"""Two-tower retrieval with the adaptive loss: a SASRec user tower and the item embedding table
as item tower, in-batch negatives with logQ correction, accidental hits excluded, AdaptiveRec's
threshold on (see adaptive_cl/rec/two_tower.py). Prints full-ranking NDCG/Recall next to the
popularity baseline.

    python examples/two_tower.py                      # the embedded synthetic data
    python examples/two_tower.py --data Beauty.txt    # one line per user: user item item ...
"""

from __future__ import annotations

import argparse
import sys

import torch

from adaptive_cl.rec.data import leave_one_out, load_dataset
from adaptive_cl.rec.metrics import evaluate_popularity
from adaptive_cl.rec.synthetic import make_synthetic
from adaptive_cl.rec.two_tower import evaluate_two_tower, train_two_tower


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(prog="two_tower.py", description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a sequence file (any format adaptive_cl.rec.data reads); "
                                   "default: the embedded synthetic data")
    ap.add_argument("--kcore", type=int, default=5, help="k-core filter of --data (default 5)")
    ap.add_argument("--users", type=int, default=2000, help="synthetic users (default 2000)")
    ap.add_argument("--items", type=int, default=500, help="synthetic items (default 500)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--quantile", type=float, default=0.99,
                    help="the threshold: this percentile of last epoch's candidate similarities")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batches", type=int, default=None, help="batches per epoch at most")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    if args.data:
        data = load_dataset(args.data, kcore=args.kcore)
    else:
        data = make_synthetic(num_users=args.users, num_items=args.items, seed=args.seed)
    split = leave_one_out(data, max_len=args.max_len)
    print(f"{data.name}: {data.num_users} users, {data.num_items} items, {split.num_train} training samples")
    model, _ = train_two_tower(
        split, epochs=args.epochs, batch_size=args.batch_size, hidden=args.hidden,
        temperature=args.temperature, quantile=args.quantile, lr=args.lr, seed=args.seed,
        device=args.device, max_batches=args.max_batches)
    results = {"two-tower": evaluate_two_tower(model, split, "test"),
               "popularity": evaluate_popularity(split, "test")}
    print(f"{'test':<12}{'NDCG@10':>10}{'Recall@10':>11}")
    for name, m in results.items():
        print(f"{name:<12}{m['NDCG@10']:>10.4f}{m['Recall@10']:>11.4f}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
