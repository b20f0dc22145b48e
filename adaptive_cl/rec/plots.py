"""Figures of a training run, from its results dict (PNG files, matplotlib's Agg backend).

- ``similarities.png``: the distribution of the candidate (negative) similarities per epoch, as
  in AdaptiveRec's Fig. 2, with each epoch's threshold;
- ``simthres.png``: the threshold used per epoch and the k_stat of each epoch (Fig. 4);
- ``uniformity_alignment.png``: uniformity vs alignment per epoch (Fig. 5), in Wang & Isola's
  form (squared distances of L2-normalised representations) unless ``decompose=True`` asks
  for the released code's unsquared distances of raw representations.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from .atomic import atomic_savefig  # noqa: E402


def _epochs(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [row for row in history if row.get(key) is not None]
    return [row["epoch"] for row in rows], [row[key] for row in rows]


def plot_similarities(results: dict, path: Path) -> Path | None:
    """Per-epoch density of the candidate similarities; None when none were recorded (run
    without ``record_histograms``, or a method without a contrastive pair)."""
    rows = [row for row in results["history"] if row.get("neg_sim_hist")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = plt.cm.RdYlGn_r(np.linspace(0, 1, len(rows)))
    for i, (color, row) in enumerate(zip(colors, rows)):
        counts = np.asarray(row["neg_sim_hist"], dtype=float)
        edges = np.linspace(-1, 1, len(counts) + 1)
        width = edges[1] - edges[0]
        ax.plot((edges[:-1] + edges[1:]) / 2, counts / max(counts.sum(), 1) / width, color=color,
                label=f"epoch {row['epoch']}" if i in (0, len(rows) - 1) else None)
        if row.get("k") is not None:
            ax.axvline(row["k"], color=color, lw=0.6, ls=":")
    ax.set_xlabel("cosine similarity c_ij over N(i) (dotted: threshold k used)")
    ax.set_ylabel("density")
    ax.set_title(f"{results['method']}: candidate similarities per epoch (green -> red)")
    ax.legend()
    return _save(fig, path)


def plot_simthres(results: dict, path: Path) -> Path | None:
    """The threshold used per epoch and the epoch's k_stat; None without thresholds."""
    history = results["history"]
    series = [(key, *_epochs(history, key)) for key in ("k", "k_stat_pooled", "k_stat_batch_mean")]
    if not any(values for _, _, values in series):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    labels = {"k": "k used (mean over batches)", "k_stat_pooled": "k_stat, pooled percentile",
              "k_stat_batch_mean": "k_stat, mean of per-batch percentiles"}
    for key, epochs, values in series:
        if values:
            ax.plot(epochs, values, marker="o", ms=3, label=labels[key])
    kstat = results["config"].get("kstat_method")
    ax.set_xlabel("epoch")
    ax.set_ylabel("SimThres")
    ax.set_title(f"{results['method']}: SimThres trajectory (k_stat rule in use: {kstat})")
    ax.legend()
    return _save(fig, path)


def plot_uniformity_alignment(results: dict, path: Path, decompose: bool = False) -> Path | None:
    """Alignment (x) vs uniformity (y), one point per epoch, coloured by epoch."""
    suffix = "_decompose" if decompose else ""
    rows = [row for row in results["history"] if row.get("uniformity" + suffix) is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    points = ax.scatter([r["alignment" + suffix] for r in rows],
                        [r["uniformity" + suffix] for r in rows],
                        c=[r["epoch"] for r in rows], cmap="viridis")
    fig.colorbar(points, ax=ax, label="epoch")
    form = ("released decompose: unsquared distances of raw representations" if decompose
            else "Wang & Isola: squared distances of L2-normalised representations")
    ax.set_xlabel("alignment E||f(x) - f(x+)||" + ("" if decompose else "^2"))
    ax.set_ylabel("uniformity log E exp(-2||f(x) - f(y)||" + ("" if decompose else "^2") + ")")
    ax.set_title(f"{results['method']}: uniformity vs alignment\n{form}\n"
                 "x+ = same-target sequence, fixed held-out batch", fontsize=8)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
    return path


def plot_results(results: dict, out_dir: str | Path) -> list[Path]:
    """Write every figure the results support into ``out_dir``; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        plot_similarities(results, out / "similarities.png"),
        plot_simthres(results, out / "simthres.png"),
        plot_uniformity_alignment(results, out / "uniformity_alignment.png"),
    ]
    return [p for p in written if p is not None]
