"""The table of a reproduction: every finished run of one dataset, mean +- std over seeds, the
paired difference to DuoRec per seed, the published numbers beside, and a plot.

Runs are named by their *setup* (a method under a named configuration, ``reproduce.SETUPS``).
Input: the ``<setup>-seed<k>.json`` files of a results folder (see :mod:`.reproduce`); output:
that folder's ``README.md`` and ``results.png``. Everything in them is derived from those files,
so rebuilding it is idempotent.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_savefig, atomic_write_text
from .published import SOURCES, published

RESULT_NAME = re.compile(r"^(?P<method>[a-z0-9_-]+?)-seed(?P<seed>\d+)\.json$")
#: Columns of the main table (test metrics of the best validation epoch).
METRICS = ("NDCG@10", "Recall@10", "NDCG@5", "Recall@5", "NDCG@20", "Recall@20", "MRR@10")
#: Metrics of the paired comparison with the baseline.
PAIRED = ("NDCG@10", "Recall@10")
BASELINE = "duorec"
#: A setup's paired baseline where it is not BASELINE: AdaptiveRec's claim is against the DuoRec
#: row of its own Table 1, DuoRec under AdaptiveRec's release configuration.
BASELINES = {"adaptiverec": "duorec-paper"}
#: Setups listed first, in this order (the issue's table); the rest follow alphabetically.
ORDER = ("sasrec", "duorec", "duorec-paper", "adaptiverec")
PLOT = "results.png"


def setup_of(record: dict) -> str:
    """A result's setup name (files written before setups existed hold only the method)."""
    return record.get("setup", record.get("method"))


def baseline_of(setup: str) -> str:
    return BASELINES.get(setup, BASELINE)


def result_path_key(path: Path) -> tuple[str, int] | None:
    """(setup, seed) of a result file name, None for any other file."""
    match = RESULT_NAME.match(path.name)
    return None if match is None else (match["method"], int(match["seed"]))


def load_results(results_dir: str | Path) -> dict[tuple[str, int], dict]:
    """Every ``<setup>-seed<k>.json`` in ``results_dir``, keyed (setup, seed).

    Raises ValueError naming the file when one does not parse or disagrees with its name (a
    silently skipped run would change the table)."""
    found: dict[tuple[str, int], dict] = {}
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return found
    for path in sorted(results_dir.iterdir()):
        key = result_path_key(path)
        if key is None:
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable results file ({err})") from None
        seed = record.get("config", {}).get("seed")
        if setup_of(record) != key[0] or seed != key[1] or not isinstance(record.get("test"), dict):
            raise ValueError(f"{path}: holds setup={setup_of(record)!r}, seed={seed!r}, "
                             f"which does not match its name (or it has no test metrics)")
        found[key] = record
    return found


def ordered_methods(methods) -> list[str]:
    methods = set(methods)
    return [m for m in ORDER if m in methods] + sorted(methods - set(ORDER))


@dataclass
class Summary:
    """Mean and sample standard deviation (None below two values) of some numbers."""

    values: list[float]
    mean: float = field(init=False)
    std: float | None = field(init=False)

    def __post_init__(self) -> None:
        self.mean = statistics.fmean(self.values)
        self.std = statistics.stdev(self.values) if len(self.values) > 1 else None

    def text(self, digits: int = 4, sign: bool = False) -> str:
        mean = f"{self.mean:+.{digits}f}" if sign else f"{self.mean:.{digits}f}"
        return mean if self.std is None else f"{mean} ± {self.std:.{digits}f}"


def summarize(records: dict[tuple[str, int], dict]) -> dict[str, dict[str, Summary]]:
    """method -> metric -> Summary over that method's seeds."""
    out: dict[str, dict[str, Summary]] = {}
    for method in ordered_methods(m for m, _ in records):
        runs = [r for (m, _), r in sorted(records.items()) if m == method]
        shared = set.intersection(*(set(r["test"]) for r in runs))
        out[method] = {metric: Summary([r["test"][metric] for r in runs])
                       for metric in sorted(shared)}
    return out


def paired(records: dict[tuple[str, int], dict], method: str, metric: str,
           baseline: str | None = None) -> dict[int, float]:
    """seed -> metric(setup, seed) - metric(baseline, seed), over the seeds both have (the
    baseline: ``baseline_of(setup)`` unless given)."""
    baseline = baseline_of(method) if baseline is None else baseline
    if baseline == method:
        return {}
    return {seed: records[(method, seed)]["test"][metric] - records[(baseline, seed)]["test"][metric]
            for (m, seed) in sorted(records) if m == method and (baseline, seed) in records}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _cell(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _main_table(records, summaries) -> list[str]:
    head = ["setup", "seeds", *METRICS, *(f"Δ{m} vs its DuoRec (paired)" for m in PAIRED)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, metrics in summaries.items():
        seeds = sorted(s for m, s in records if m == method)
        cells = [method, ", ".join(map(str, seeds))]
        cells += [metrics[m].text() if m in metrics else "—" for m in METRICS]
        for metric in PAIRED:
            diffs = paired(records, method, metric)
            cells.append(f"{Summary(list(diffs.values())).text(sign=True)} (n={len(diffs)}, "
                         f"vs {baseline_of(method)})"
                         if diffs else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _published_table(dataset, summaries) -> list[str]:
    metrics = ("NDCG@5", "NDCG@10", "Recall@5", "Recall@10", "MRR@5", "MRR@10")
    lines = ["| method | row | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 2)]
    for method, ours in summaries.items():
        entries = published(dataset, method)
        if not entries:
            continue
        lines.append(f"| {method} | reproduced (mean) | "
                     + " | ".join(_cell(ours[m].mean if m in ours else None) for m in metrics)
                     + " |")
        for entry in entries:
            lines.append(f"| {method} | published [{entry.source}] | "
                         + " | ".join(_cell(entry.metrics.get(m)) for m in metrics) + " |")
            gaps = [ours[m].mean - entry.metrics[m] if m in ours and m in entry.metrics else None
                    for m in metrics]
            lines.append(f"| {method} | reproduced − published | "
                         + " | ".join("—" if g is None else f"{g:+.4f}" for g in gaps) + " |")
    return lines


def _setups_table(records) -> list[str]:
    """What each setup ran: method, preset and the settings that tell them apart."""
    keys = ("batch_size", "drop_last", "lr_schedule", "similarity", "simthres", "stop_metric",
            "epochs")
    lines = ["| setup | method | preset | " + " | ".join(keys) + " |",
             "|" + "---|" * (len(keys) + 3)]
    seen = set()
    for (setup, _), r in sorted(records.items(), key=lambda kv: ordered_methods(
            m for m, _ in records).index(kv[0][0])):
        if setup in seen:
            continue
        seen.add(setup)
        c = r.get("config", {})
        lines.append(f"| {setup} | {r.get('method')} | {r.get('preset', '—')} | "
                     + " | ".join(str(c.get(k, "—")) for k in keys) + " |")
    return lines


def _runs_table(records) -> list[str]:
    head = ["run", "NDCG@10", "Recall@10", "Δ NDCG@10 vs its DuoRec", "best epoch", "epochs",
            "s/epoch (median)", "device", "torch", "sessions"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in ordered_methods(m for m, _ in records):
        for (m, seed), r in sorted(records.items()):
            if m != method:
                continue
            diff = paired(records, m, "NDCG@10").get(seed)
            best = next((row["epoch"] for row in r.get("history", [])
                         if row.get("valid") == r.get("valid")), None)
            seconds = _median([row["seconds"] for row in r.get("history", []) if "seconds" in row])
            lines.append("| " + " | ".join([
                f"{m}-seed{seed}", _cell(r["test"].get("NDCG@10")), _cell(r["test"].get("Recall@10")),
                "—" if diff is None else f"{diff:+.4f}", str(best or "—"), str(r.get("epochs", "—")),
                _cell(seconds, 2), str(r.get("device_name", "—")), str(r.get("torch", "—")),
                str(len(r.get("segments", [])) or "—")]) + " |")
    return lines


def plot(records, summaries, dataset: str, path: Path) -> Path | None:
    """Per-seed points, mean ± std and the published numbers for NDCG@10 and Recall@10; None
    when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = list(summaries)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(methods), 3.6))
    markers = {source: marker for source, marker in zip(SOURCES, "Ds^v")}
    for ax, metric in zip(axes, PAIRED):
        for x, method in enumerate(methods):
            values = [r["test"][metric] for (m, _), r in sorted(records.items()) if m == method]
            ax.scatter([x] * len(values), values, s=14, color="0.55", zorder=2,
                       label="run (one seed)" if x == 0 else None)
            if metric in summaries[method]:
                s = summaries[method][metric]
                ax.errorbar([x], [s.mean], yerr=[s.std or 0.0], fmt="_", color="C0", ms=18,
                            capsize=4, zorder=3, label="mean ± std" if x == 0 else None)
            for entry in published(dataset, method):
                if metric in entry.metrics:
                    ax.scatter([x + 0.18], [entry.metrics[metric]], marker=markers[entry.source],
                               facecolors="none", edgecolors="C3" if entry.source ==
                               "adaptiverec-paper" else "C2", zorder=3, s=36,
                               label=f"published [{entry.source}]")
        ax.set_xticks(range(len(methods)), methods, rotation=20)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_title(f"{dataset}: test {metric}")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    atomic_savefig(fig, path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def write_report(results_dir: str | Path, dataset: str, *, command: str,
                 unfinished: list[str] = ()) -> Path:
    """(Re)write ``results_dir/README.md`` (and the plot) from the finished runs there."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    records = load_results(results_dir)
    summaries = summarize(records)
    lines = [f"# Reproduction: {dataset}", "",
             "Generated from the run files in this folder (one `<setup>-seed<k>.json` per "
             "finished run) by", "", f"    {command}", "",
             "Do not edit by hand: the next invocation rewrites it."]
    if not records:
        lines += ["", "No run has finished yet."]
    else:
        lines += ["", "## Test metrics", "",
                  "Full ranking over all items, leave-one-out, weights of the best validation "
                  "epoch (NDCG@10, or MRR@10 where the setup's release stops on it); mean ± "
                  "sample standard deviation over seeds. Δ vs its DuoRec: the setup's metric "
                  "minus its DuoRec baseline's with the same seed (adaptiverec: duorec-paper, "
                  "the same release configuration; the others: duorec), mean ± std over the "
                  "seeds both have (n).", "", *_setups_table(records),
                  "", *_main_table(records, summaries)]
        table = _published_table(dataset, summaries)
        if len(table) > 2:
            lines += ["", "## Against the published numbers", "", *table, "",
                      *(f"- [{tag}] {text}" for tag, text in SOURCES.items())]
        image = plot(records, summaries, dataset, results_dir / PLOT)
        if image is None:
            (results_dir / PLOT).unlink(missing_ok=True)
            lines += ["", "(No plot: matplotlib is not installed.)"]
        else:
            lines += ["", f"![test NDCG@10 and Recall@10 per method]({PLOT})"]
        lines += ["", "## Runs", "", *_runs_table(records), "",
                  "s/epoch: the wall time of an epoch (training pass, geometry, validation), "
                  "measured with as many runs sharing the device as the reproduction ran at "
                  "once; the training-speed targets are checked by `benchmarks/train_speed.py`."]
    if unfinished:
        lines += ["", "## Not finished", "",
                  *(f"- {text}" for text in unfinished)]
    path = results_dir / "README.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
