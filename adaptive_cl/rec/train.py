"""The seeded, resumable training loop of every method.

One epoch = a shuffled pass over the training samples; after it the loop syncs with the device
once (losses are accumulated on the device), evaluates on the validation users, updates SimThres
from the epoch's similarity statistics, and writes a checkpoint atomically. Early stopping
watches validation NDCG@10; the test metrics come from the best epoch's weights.

The training step is built for a GPU: the training data live on the device and batches,
same-target partners and augmentations are drawn there from a device generator; nothing in a
step reads a value back to the host (see :mod:`.hostsync`); every sequence of a step goes through
the encoder in one pass; with ``compile`` the encoder's training passes run through
``torch.compile`` (Inductor's fused kernels; the CLI turns it on for CUDA), with ``amp`` under
bf16 autocast; Adam is the fused kernel where torch has one.

Resuming from ``out_dir/checkpoint.pt`` restores the model, optimizer, scheduler, thresholds,
statistics, every RNG (python, numpy, torch, CUDA, and the generator used for shuffling,
same-target sampling and augmentation), the history and the early-stopping state, so on the CPU
a resumed run is bit-identical to an uninterrupted one.

A step is zero_grad / backward / step of one Adam over the model and the objective's parameters,
unless the objective defines ``train_step`` (MCLRec: three steps, its augmenters with an Adam of
their own, which it keeps in its state dict, so checkpoints carry it) and ``main_parameters``
(what the shared Adam may update).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..backends import BACKENDS
from .atomic import atomic_save
from .augment import MASK_IDS, Augmenter
from .data import LeaveOneOutSplit
from .ddp import DataParallel
from .mclrec import REGULARIZERS, UPDATES, MCLRecObjective
from .metrics import TIES, alignment, evaluate_full_ranking, uniformity
from .model import SASRec
from .objectives import (
    CONTRASTS,
    AdaptiveRecObjective,
    Batch,
    CL4SRecObjective,
    ContrastiveTerm,
    DuoRecObjective,
    ObjectiveOutput,
    SASRecObjective,
)
from .rcl import NGRAMS, RCLObjective, weak_positives
from .rcl import WEIGHTINGS as RCL_WEIGHTINGS
from ..contract import MAX_STATS_BINS
from .simthres import (
    KSTAT_METHODS,
    KSTAT_STARTS,
    THRESHOLD_INITS,
    FlattenedThresholdNet,
    LearnableSimThres,
    SimilarityStats,
    StatisticalSimThres,
    ThresholdNet,
)

METHODS = ("sasrec", "cl4srec", "duorec", "adaptiverec", "rcl", "mclrec")
#: Methods that can take AdaptiveRec's threshold (on top of their own terms for rcl, mclrec).
THRESHOLDED = ("adaptiverec", "rcl", "mclrec")
SIMTHRES = ("none", "statistical", "learnable", "learnable-flat")
PRESETS = ("default", "paper", "release")
SCHEDULES = ("constant", "cosine", "warmup-cosine")
#: Validation metrics early stopping may watch (DuoRec and MCLRec release: MRR@10).
STOP_METRICS = ("NDCG@10", "MRR@10", "Recall@10")
SIMILARITIES = ("auto", "cos", "dot")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
CHECKPOINT = "checkpoint.pt"
#: Fields a resumed run may change; everything else must match the checkpoint's config.
RESUMABLE_CHANGES = ("epochs", "patience", "progress", "record_histograms", "compile",
                     "compile_mode")
HISTOGRAM_BINS = 64

#: What the "paper" preset changes: the released AdaptiveRec configuration (its ``seq.yaml``;
#: README: "Presets"), for AdaptiveRec and for the DuoRec baseline of its Table 1.
PAPER_PRESET = dict(
    batch_size=1024,
    drop_last=True,
    lr_schedule="warmup-cosine",
    warmup_epochs=5,
    lr_floor=1e-4,
    similarity="cos",
)
#: On top of PAPER_PRESET for adaptiverec: its threshold as released.
PAPER_ADAPTIVEREC = dict(
    simthres="learnable-flat",
    threshold_init="normal",
    threshold_detach=False,
    reg_squared=False,
    denominator="all",
    weighting="normalized",
    kstat_method="batch_mean",
)

#: The "release" preset: each method as its authors' released code configures it.
RELEASE_PRESETS = {
    "sasrec": dict(),  # RecBole's SASRec: the default protocol
    "duorec": dict(similarity="dot", batch_size=256, epochs=50, stop_metric="MRR@10"),
    "cl4srec": dict(similarity="dot"),  # as in the DuoRec repository
    "adaptiverec": {**PAPER_PRESET, **PAPER_ADAPTIVEREC},
    "mclrec": dict(mclrec_regularizer="code", mask_id="padding", stop_metric="MRR@10",
                   batch_size=256, epochs=100),
    # No released full-ranking code: the paper's 2-gram similarity; tau and lambda stay the
    # protocol's unless set (--temperature, --cl-weight).
    "rcl": dict(rcl_ngram=2),
}

#: Per-method defaults that ``from_preset`` applies unless the preset or a caller sets them:
#: RCL and MCLRec run without a threshold (their papers' losses) and MCLRec with its own
#: augmentation rates.
METHOD_DEFAULTS = {
    "rcl": dict(simthres="none"),
    "mclrec": dict(simthres="none", crop=0.5, mask=0.5, reorder=0.8),
}



def progress_bar(iterable=None, **kwargs):
    """tqdm when it is installed (the ``examples`` extra); otherwise a silent pass-through, with
    one warning if a bar was asked for, so the library itself needs only torch and numpy."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if not kwargs.get("disable", False):
            warnings.warn("tqdm is not installed (pip install 'adaptive-cl[examples]'): no progress bar",
                          RuntimeWarning, stacklevel=2)
        return _NoBar(iterable)
    return tqdm(iterable, **kwargs)


class _NoBar:
    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


#: The value checks a setting may declare: (test, what the value must be).
CHECKS = {
    "int>=1": (lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= 1,
               "an integer >= 1"),
    ">0": (lambda v: 0 < v < math.inf, "finite and > 0"),
    ">=0": (lambda v: 0 <= v < math.inf, "finite and >= 0"),
    "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "(0,1]": (lambda v: 0 < v <= 1, "in (0, 1]"),
}


def setting(default, help: str, *, choices=None, check: str | None = None,
            methods: tuple[str, ...] | None = None):
    """One training setting, declared once: its default, its help (the CLI's), the values it
    may take (``choices`` or a ``CHECKS`` key; ``None`` passes where the default is None) and
    the methods it applies to (the CLI refuses it for others). :meth:`TrainConfig.validate`
    and the CLI (``cli.py``) both read these."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, choices=choices, check=check, methods=methods))


@dataclass
class TrainConfig:
    """Every hyper-parameter of a run (recorded in the results). Defaults = the protocol's
    (README, "The pipeline's protocol"); each field's metadata holds its help, its allowed
    values and the methods it applies to (:func:`setting`), from which the CLI is generated.

    Build presets with :meth:`from_preset`; setting ``preset="paper"`` by hand only labels the
    run and changes nothing else.
    """

    method: str = setting("adaptiverec", "the training objective", choices=METHODS)
    contrast: str = setting("us_x", "DuoRec/AdaptiveRec view pair: un, su or us_x",
                            choices=CONTRASTS, methods=("duorec", "adaptiverec"))
    simthres: str = setting(
        "statistical", "AdaptiveRec's threshold: statistical, learnable, learnable-flat (the "
        "released flattened-batch network) or none (rcl and mclrec default: none)",
        choices=SIMTHRES, methods=THRESHOLDED)
    preset: str = setting("default", "the preset the run was built from (README: Presets)",
                          choices=PRESETS)
    epochs: int = setting(50, "training epochs at most (the CLI: 3 on the synthetic data, 100 "
                              "with --data, unless the preset sets them)", check="int>=1")
    batch_size: int = setting(256, "training batch size", check="int>=1")
    drop_last: bool = setting(False, "drop each epoch's partial last batch")
    lr: float = setting(1e-3, "Adam learning rate", check=">0")
    weight_decay: float = setting(0.0, "Adam weight decay", check=">=0")
    lr_schedule: str = setting("constant", "per-epoch learning-rate schedule",
                               choices=SCHEDULES)
    warmup_epochs: int = setting(5, "warmup-cosine: epochs of linear warm-up from lr_floor",
                                 check="int>=1")
    lr_floor: float = setting(1e-4, "warmup-cosine: where the warm-up starts and the cosine "
                                    "ends", check=">0")
    max_len: int = setting(50, "longest input sequence (the CLI: 20 on the synthetic data)",
                           check="int>=1")
    hidden: int = setting(64, "transformer width", check="int>=1")
    layers: int = setting(2, "transformer blocks", check="int>=1")
    heads: int = setting(2, "attention heads", check="int>=1")
    inner: int = setting(256, "feed-forward width", check="int>=1")
    dropout: float = setting(0.5, "hidden-state dropout", check="[0,1]")
    attn_dropout: float = setting(0.5, "attention dropout", check="[0,1]")
    cl_weight: float = setting(0.1, "weight of the contrastive term, lambda", check=">=0")
    temperature: float = setting(1.0, "contrastive temperature, tau", check=">0")
    similarity: str = setting("auto", "contrastive similarity: cos or dot (auto: dot for "
                                      "duorec, cos otherwise)", choices=SIMILARITIES)
    positive_weight: float = setting(0.5, "AdaptiveRec's alpha: the view partner's target "
                                          "weight", check="(0,1]")
    denominator: str = setting("negatives", "AdaptiveRec's LSE over the negatives (paper Eq. 9) "
                                            "or all candidates (released code)",
                               choices=("negatives", "all"))
    weighting: str = setting("normalized", "AdaptiveRec's target weights",
                             choices=("normalized", "unit"))
    threshold: str = setting("hard", "hard threshold or soft sigmoid((c - k) / scale)",
                             choices=("hard", "soft"))
    threshold_scale: float = setting(0.05, "the soft threshold's scale beta", check=">0")
    kstat_method: str = setting("pooled", "k_stat: percentile of the pooled epoch or mean of "
                                          "per-batch percentiles", choices=KSTAT_METHODS)
    kstat_percentile: float = setting(0.9, "k_stat's percentile as a fraction", check="[0,1]")
    kstat_bins: int = setting(2048, "histogram bins of the similarity statistics (a power of "
                                    "two)", check="int>=1")
    kstat_start: str = setting(
        "running", "statistical SimThres in the first epoch, before any statistic: running (the "
        "epoch's batches so far), none (no extra positives), zero (k = 0)",
        choices=KSTAT_STARTS)
    reg_weight: float = setting(0.1, "learnable SimThres: weight of ||k - k_stat||",
                                check=">=0")
    reg_squared: bool = setting(False, "square the regulariser (the paper) instead of the "
                                       "released unsquared norm")
    threshold_width: int = setting(64, "learnable SimThres network width", check="int>=1")
    threshold_init: str = setting("default", "learnable-flat's initialisation: nn.Linear's or "
                                             "normal N(0, 0.02) (the release)",
                                  choices=THRESHOLD_INITS)
    threshold_detach: bool = setting(True, "feed the threshold network detached "
                                           "representations (the release feeds them attached)")
    crop: float = setting(0.6, "crop augmentation: fraction kept", check="[0,1]")
    mask: float = setting(0.3, "mask augmentation: fraction masked", check="[0,1]")
    reorder: float = setting(0.6, "reorder augmentation: fraction shuffled", check="[0,1]")
    mask_id: str = setting("token", "the mask augmentation writes a dedicated token or the "
                                    "padding id (MCLRec's release)", choices=MASK_IDS,
                           methods=("cl4srec", "mclrec"))
    # RCL (rcl.py): lambda is cl_weight, tau is temperature.
    rcl_alpha: float = setting(0.05, "RCL: top fraction of similar training histories kept per "
                                     "user", check="(0,1]", methods=("rcl",))
    rcl_ngram: int = setting(1, "RCL: Jaccard over items (1) or consecutive item pairs (2)",
                             choices=NGRAMS, methods=("rcl",))
    rcl_weighting: str = setting("similarity", "RCL weak-term weights: similarity (Eq. 16), row "
                                               "(released code), none (Eq. 14)",
                                 choices=RCL_WEIGHTINGS, methods=("rcl",))
    rcl_weight_power: float = setting(0.1, "RCL 'row' weights s ** power", check=">=0",
                                      methods=("rcl",))
    # MCLRec (mclrec.py)
    mclrec_lambda: float = setting(0.0, "MCLRec: weight of L_cl1", check=">=0",
                                   methods=("mclrec",))
    mclrec_beta: float = setting(0.05, "MCLRec: weight of L_cl2", check=">=0",
                                 methods=("mclrec",))
    mclrec_reg_weight: float = setting(0.1, "MCLRec: regulariser weight gamma / beta",
                                       check=">=0", methods=("mclrec",))
    mclrec_regularizer: str = setting("paper", "MCLRec's R: paper (Eqs. 11-15) or code (per "
                                               "row, three pairs)", choices=REGULARIZERS,
                                      methods=("mclrec",))
    mclrec_update: str = setting("alternating", "MCLRec: alternating encoder/augmenter/encoder "
                                                "steps, or joint (a deviation)",
                                 choices=UPDATES, methods=("mclrec",))
    max_batches: int | None = setting(None, "train at most this many batches per epoch (smoke "
                                            "tests)", check="int>=1")
    patience: int = setting(10, "early stopping: epochs without improvement", check="int>=1")
    stop_metric: str = setting("NDCG@10", "validation metric of early stopping and the best "
                                          "epoch", choices=STOP_METRICS)
    eval_batch_size: int = setting(1024, "users per evaluation batch", check="int>=1")
    mask_history: bool = setting(False, "mask each user's history items in the ranking (the "
                                        "protocol does not)")
    ties: str = setting("pessimistic", "how tied scores rank", choices=TIES)
    seed: int = setting(2024, "random seed")
    device: str = setting("cpu", "torch device")
    amp: bool = setting(False, "bf16 autocast (CUDA only)")
    compile: bool = setting(False, "torch.compile the encoder's training passes")
    compile_mode: str = setting("default", "torch.compile's mode (reduce-overhead: CUDA graphs)",
                                choices=COMPILE_MODES)
    record_histograms: bool = setting(False, "record per-epoch similarity histograms (plots)")
    holdout_size: int = setting(512, "held-out sequences for uniformity and alignment",
                                check="int>=1")
    loss_backend: str = setting("auto", "adaptive_info_nce's backend", choices=BACKENDS)
    progress: bool = setting(True, "progress bars")

    @classmethod
    def preset_fields(cls, preset: str, method: str) -> dict:
        """What ``preset`` sets for ``method`` (README, "Presets"): ``"default"`` the
        protocol; ``"paper"`` the released AdaptiveRec configuration (for ``adaptiverec``, and
        for ``duorec`` as the DuoRec row of AdaptiveRec's Table 1); ``"release"`` each method's
        own released configuration."""
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        base = dict(METHOD_DEFAULTS.get(method, {}))
        if preset == "paper":
            if method not in ("adaptiverec", "duorec"):
                raise ValueError(f"preset 'paper' is AdaptiveRec's released configuration, for "
                                 f"adaptiverec and its duorec baseline, not {method}; use "
                                 f"preset 'release' for {method}'s own")
            base.update(PAPER_PRESET)
            if method == "adaptiverec":
                base.update(PAPER_ADAPTIVEREC)
        elif preset == "release":
            base.update(RELEASE_PRESETS[method])
        return base

    @classmethod
    def from_preset(cls, preset: str = "default", **overrides) -> TrainConfig:
        """The configuration of ``preset`` (see :meth:`preset_fields`) with ``overrides``
        applied on top."""
        base = cls.preset_fields(preset, overrides.get("method", cls.method))
        config = cls(**{**base, **overrides, "preset": preset})
        config.validate()
        return config

    @property
    def normalize(self) -> bool:
        """Cosine similarity in the contrastive loss (False = the dot product of DuoRec, RCL and
        MCLRec; RCL and MCLRec switch to cosine under a SimThres, a cosine level)."""
        if self.similarity == "auto":
            if self.method in ("rcl", "mclrec"):
                return self.simthres != "none"
            return self.method != "duorec"
        return self.similarity == "cos"

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta.get("choices") is not None and value not in meta["choices"]:
                raise ValueError(f"{f.name} must be one of {meta['choices']}, got {value!r}")
            if meta.get("check") and not (value is None and f.default is None):
                ok, what = CHECKS[meta["check"]]
                try:
                    good = ok(value)
                except TypeError:  # a string where a number belongs
                    good = False
                if not good:
                    raise ValueError(f"{f.name} must be {what}, got {value!r}")
        if self.lr_schedule == "warmup-cosine" and not self.lr_floor <= self.lr:
            raise ValueError(f"lr_floor must be <= lr for the warmup-cosine schedule, got "
                             f"lr_floor={self.lr_floor!r}, lr={self.lr!r}")
        if self.mask_id == "padding" and self.method not in ("cl4srec", "mclrec"):
            raise ValueError(f"mask_id='padding' only applies to cl4srec and mclrec (their mask "
                             f"augmentation), not {self.method}")
        if self.simthres == "learnable-flat" and not self.drop_last:
            raise ValueError("simthres='learnable-flat' has a fixed batch size: set drop_last=True")
        if self.kstat_bins & (self.kstat_bins - 1) or self.kstat_bins > MAX_STATS_BINS:
            raise ValueError(f"kstat_bins must be a power of two <= {MAX_STATS_BINS} (the loss's "
                             f"in-kernel histogram), got {self.kstat_bins}")
        if self.record_histograms and self.kstat_bins % HISTOGRAM_BINS:
            raise ValueError(f"kstat_bins must be a multiple of {HISTOGRAM_BINS} to record "
                             f"histograms, got {self.kstat_bins}")
        if self.threshold == "soft" and self.simthres == "none":
            raise ValueError("threshold='soft' needs a simthres other than 'none'")
        if self.method == "rcl" and self.simthres != "none" and self.rcl_weighting == "similarity":
            raise ValueError("rcl_weighting='similarity' (Eq. 16) is no adaptive_info_nce loss, "
                             "so a SimThres cannot act on it: use rcl_weighting 'row' or 'none', "
                             "or simthres='none'")
        if self.method in THRESHOLDED and self.simthres != "none" and not self.normalize:
            # k_stat is a percentile of cosines and g's output lies in (-1.05, 1.05): compared
            # with unbounded dot products it would be meaningless.
            raise ValueError("similarity='dot' cannot be thresholded: AdaptiveRec's SimThres is "
                             "a cosine level; use similarity='cos' (or 'auto') or simthres='none'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """The per-epoch schedule of ``config.lr_schedule`` (None for ``"constant"``), stepped once
    after every epoch, so epoch e (from 0) trains at lr_e:

    - ``"cosine"``: ``CosineAnnealingLR`` over ``epochs``, down to 0;
    - ``"warmup-cosine"`` (AdaptiveRec's release, timm's ``CosineLRScheduler`` with
      ``warmup_t=W, warmup_lr_init=lr_min=lr_floor, t_initial=epochs``): lr_e = floor + (lr -
      floor) e / W while e < W, then floor + (lr - floor) (1 + cos(pi e / epochs)) / 2.
    """
    c = config
    if c.lr_schedule == "constant":
        return None
    if c.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=c.epochs)
    floor = c.lr_floor / c.lr

    def factor(e: int) -> float:
        if e < c.warmup_epochs:
            return floor + (1.0 - floor) * e / c.warmup_epochs
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(e, c.epochs) / c.epochs))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message says why, on one line."""


#: What a checkpoint of :class:`Trainer` holds besides its config (``state_dict``'s keys).
CHECKPOINT_KEYS = ("epoch", "model", "objective", "statistical_simthres", "optimizer",
                   "scheduler", "stats", "rng", "history", "best", "train_seconds")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load`` a checkpoint onto the CPU (``weights_only=True``), turning every way of
    failing (missing, a directory, empty, truncated, not a torch file) into a one-line
    :class:`CheckpointError`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        # RNG states must stay on the CPU; the load_state_dict calls move the rest.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch reports a bad file in many exception types
        raise CheckpointError(f"cannot read {path} as a checkpoint ({_first_line(err)})") from None


def _rng_state(generator: torch.Generator) -> dict:
    """Every RNG the run draws from, in tensors and plain values (``weights_only`` loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
    }


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])


class _ModelAndObjective(torch.nn.Module):
    """The encoder and the objective (which may hold a threshold network) as one module, so
    DistributedDataParallel syncs every trained parameter."""

    def __init__(self, model: torch.nn.Module, objective: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Batch, generator: torch.Generator):
        return self.objective(self.model, batch, generator)


class Trainer:
    """Train one method on a leave-one-out split (see :func:`train`).

    ``ddp``: a :class:`~adaptive_cl.rec.ddp.DataParallel` to train data-parallel (every process
    constructs its Trainer alike and runs ``fit``; see rec/ddp.py).
    """

    def __init__(
        self,
        config: TrainConfig,
        split: LeaveOneOutSplit,
        out_dir: str | Path | None = None,
        *,
        dataset: str = "synthetic",
        callback: Callable[[dict], None] | None = None,
        cache_dir: str | Path | None = None,
        ddp: DataParallel | None = None,
    ) -> None:
        config.validate()
        if ddp is not None:
            DataParallel.check_config(config)
            if config.compile:
                raise ValueError("compile applies to single-process training: data-parallel "
                                 "runs are eager (DDP wraps the plain module); set compile=False")
        if config.max_len != split.max_len:
            raise ValueError(f"config.max_len={config.max_len} but the split was built with "
                             f"max_len={split.max_len}")
        self.config = config
        self.split = split
        self.dataset = dataset
        self.callback = callback
        self.ddp = ddp
        self.is_main = ddp is None or ddp.rank == 0  # prints, progress bars and files
        self.out_dir = Path(out_dir) if out_dir is not None else None
        # Derived data (RCL's weak positives) is cached in cache_dir, else in out_dir/cache,
        # else (neither given) recomputed by every run.
        if cache_dir is None and self.out_dir is not None:
            cache_dir = self.out_dir / "cache"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device = torch.device(config.device)
        self.amp = config.amp and self.device.type == "cuda"

        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)

        self.model = SASRec(
            split.num_items, split.max_len,
            mask_token=config.method in ("cl4srec", "mclrec") and config.mask_id == "token",
            hidden=config.hidden, layers=config.layers, heads=config.heads, inner=config.inner,
            dropout=config.dropout, attn_dropout=config.attn_dropout,
        ).to(self.device)
        # Training passes go through step_model: the same module (same parameters, state dict),
        # compiled when asked. Evaluation stays eager: once per epoch, it is not worth the
        # recompilations its eval mode and batch sizes would cost.
        self.step_model = (
            torch.compile(self.model, dynamic=False, mode=config.compile_mode)
            if config.compile else self.model
        )
        self.stats = SimilarityStats(config.kstat_percentile, config.kstat_bins, self.device)
        self.objective = self._build_objective().to(self.device)
        # An objective with optimizers of its own (MCLRec's augmenters) names what remains.
        objective_params = getattr(self.objective, "main_parameters", self.objective.parameters)
        self.optimizer = torch.optim.Adam(
            [*self.model.parameters(), *objective_params()],
            lr=config.lr, weight_decay=config.weight_decay,
            # One kernel for every parameter instead of several per parameter.
            fused=True if self.device.type in ("cuda", "cpu") else None,
        )
        self.scheduler = lr_scheduler(self.optimizer, config)

        self._eval_tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.train_inputs = split.train_inputs.to(self.device)
        self.train_targets = split.train_targets.to(self.device)
        self.same_target = split.same_target.to(self.device)
        # A fixed held-out batch of training sequences and same-target partners for the
        # per-epoch uniformity / alignment, drawn from its own generator, among the samples
        # that have another sample with their target (a sample "paired" with itself would add
        # a zero distance to the alignment).
        held = torch.Generator().manual_seed(config.seed + 1)
        paired = torch.nonzero(split.same_target.size.cpu() > 1).squeeze(1)
        pool = paired if len(paired) >= 2 else torch.arange(split.num_train)
        n = min(config.holdout_size, len(pool))
        self.holdout = pool[torch.randperm(len(pool), generator=held)[:n]]
        self.holdout_partner = split.same_target.sample(self.holdout, held)

        self.data_fingerprint = split.fingerprint()
        self.epoch = 0
        self.history: list[dict] = []
        self.best_metric = -math.inf
        self.best_epoch = 0
        self.best_state = copy.deepcopy(self.model.state_dict())
        self.bad_epochs = 0
        self.train_seconds = 0.0

        self._ddp_step = None
        if ddp is not None:  # rec/ddp.py
            self._ddp_step = torch.nn.parallel.DistributedDataParallel(
                _ModelAndObjective(self.model, self.objective),
                device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if ddp.rank:  # dropout: a stream per process (process 0 keeps the single-process one)
                torch.manual_seed(config.seed + 7919 * ddp.rank)

    def _build_objective(self) -> torch.nn.Module:
        c = self.config
        if c.method == "sasrec":
            return SASRecObjective()
        if c.method == "cl4srec":
            augmenter = Augmenter(self.split.num_items, c.crop, c.mask, c.reorder, c.mask_id)
            return CL4SRecObjective(augmenter, c.cl_weight, c.temperature, c.loss_backend)
        if c.method == "duorec":
            return DuoRecObjective(c.contrast, c.cl_weight, c.temperature, c.normalize,
                                   c.loss_backend)
        simthres = self._build_simthres()
        if c.method in ("rcl", "mclrec"):
            term = ContrastiveTerm(simthres, c.temperature, c.normalize, c.positive_weight,
                                   c.denominator, c.weighting, c.threshold, c.threshold_scale,
                                   c.loss_backend)
            if c.method == "rcl":
                weak = weak_positives(self.split, c.rcl_alpha, c.rcl_ngram, self.cache_dir)
                return RCLObjective(weak, self.split.train_inputs,
                                    self.split.same_target.size > 1, term, c.cl_weight,
                                    c.rcl_weighting, c.rcl_weight_power)
            augmenter = Augmenter(self.split.num_items, c.crop, c.mask, c.reorder, c.mask_id)
            return MCLRecObjective(c.hidden, augmenter, term, c.mclrec_lambda, c.mclrec_beta,
                                   c.mclrec_reg_weight, c.mclrec_regularizer, c.mclrec_update,
                                   c.lr, c.weight_decay)
        return AdaptiveRecObjective(
            simthres, c.contrast, c.cl_weight, c.temperature, c.normalize, c.positive_weight,
            c.denominator, c.weighting, c.threshold, c.threshold_scale, c.loss_backend,
        )

    def _build_simthres(self) -> StatisticalSimThres | LearnableSimThres | None:
        c = self.config
        if c.simthres == "statistical":
            return StatisticalSimThres(c.kstat_start, self.stats, c.kstat_method)
        if c.simthres == "learnable":
            return LearnableSimThres(ThresholdNet(c.hidden, c.threshold_width), c.reg_weight,
                                     c.reg_squared, c.threshold_detach)
        if c.simthres == "learnable-flat":
            return LearnableSimThres(
                FlattenedThresholdNet(c.batch_size, c.hidden, c.threshold_init), c.reg_weight,
                c.reg_squared, c.threshold_detach)
        return None

    @property
    def simthres(self) -> StatisticalSimThres | LearnableSimThres | None:
        return getattr(self.objective, "simthres", None)

    # ------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        simthres = self.simthres
        return {
            "config": self.config.to_dict(),
            "data": {"fingerprint": self.data_fingerprint, "name": self.dataset,
                     "num_items": self.split.num_items, "num_train": self.split.num_train},
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "statistical_simthres": simthres.state_dict()
            if isinstance(simthres, StatisticalSimThres) else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "stats": self.stats.state_dict(),
            "rng": _rng_state(self.generator),
            # data-parallel runs: every process's random state (dropout streams differ)
            "rng_processes": None if self.ddp is None else self.ddp.all_gather_object(_rng_state(self.generator)),
            "history": self.history,
            "best": {"metric": self.best_metric, "epoch": self.best_epoch,
                     "state": self.best_state, "bad_epochs": self.bad_epochs},
            "train_seconds": self.train_seconds,
        }

    def check_state_dict(self, state: object) -> None:
        """Raise :class:`CheckpointError` unless ``state`` is a checkpoint of this trainer made
        from the same config (up to ``RESUMABLE_CHANGES``) and the same data."""
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise CheckpointError("not a checkpoint of this trainer (no config in it)")
        missing = [key for key in CHECKPOINT_KEYS if key not in state]
        if missing:
            raise CheckpointError(f"not a checkpoint of this trainer (no {', '.join(missing)})")
        # A field added after the checkpoint was written counts as its default value.
        saved = {**dataclasses.asdict(TrainConfig()), **state["config"]}
        current = self.config.to_dict()
        differ = [k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]]
        if differ:
            raise CheckpointError(
                "the checkpoint was written with a different config: "
                + ", ".join(f"{k}={saved.get(k)!r} (now {current[k]!r})" for k in differ)
            )
        data = state.get("data")  # absent in checkpoints older than the fingerprint
        if data is not None and data.get("fingerprint") != self.data_fingerprint:
            raise CheckpointError(
                f"the checkpoint was trained on other data ({data.get('name')!r}: "
                f"{data.get('num_items')} items, {data.get('num_train')} training samples; now "
                f"{self.dataset!r}: {self.split.num_items} items, {self.split.num_train}): "
                "resume with the same data file, format and max_len"
            )
        processes = state.get("rng_processes")
        written, now = (1 if processes is None else len(processes)), (1 if self.ddp is None else self.ddp.world)
        if written != now:  # each process resumes its own dropout stream
            raise CheckpointError(f"the checkpoint was written by {written} process(es); resume "
                                  f"with the same number (now {now})")

    def load_state_dict(self, state: dict) -> None:
        self.check_state_dict(state)
        self.epoch = state["epoch"]
        try:
            self.model.load_state_dict(state["model"])
            self.objective.load_state_dict(state["objective"])
        except RuntimeError as err:  # an old checkpoint (no fingerprint) of another dataset
            raise CheckpointError(
                f"the checkpoint's weights do not fit this model: {_first_line(err)}"
            ) from None
        if state["statistical_simthres"] is not None:
            self.simthres.load_state_dict(state["statistical_simthres"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.stats.load_state_dict(state["stats"])
        processes = state.get("rng_processes")  # data-parallel runs: one RNG state per process
        _set_rng_state(state["rng"] if processes is None else processes[self.ddp.rank], self.generator)
        self.history = list(state["history"])
        best = state["best"]
        self.best_metric, self.best_epoch = best["metric"], best["epoch"]
        self.best_state, self.bad_epochs = best["state"], best["bad_epochs"]
        self.train_seconds = state["train_seconds"]

    def save_checkpoint(self) -> None:
        """Write ``out_dir/checkpoint.pt`` atomically (data-parallel: a collective; process 0 writes)."""
        if self.out_dir is not None:
            state = self.state_dict()
            if self.is_main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                atomic_save(state, self.out_dir / CHECKPOINT)

    def resume(self) -> None:
        """Continue from ``out_dir/checkpoint.pt``, or raise :class:`CheckpointError` (a
        ``ValueError``) saying why it cannot: missing, unreadable, not this trainer's, another
        config or other data. Load only checkpoints you trust; they are read with
        ``weights_only=True`` all the same."""
        if self.out_dir is None:
            raise CheckpointError("resume needs an out_dir holding checkpoint.pt")
        self.load_state_dict(read_checkpoint(self.out_dir / CHECKPOINT))

    # --------------------------------------------------------------------------- training

    def _autocast(self):
        return torch.autocast("cuda", torch.bfloat16, enabled=self.amp)

    def _batches(self) -> list[torch.Tensor]:
        c, n = self.config, self.split.num_train
        order = torch.randperm(n, generator=self.generator, device=self.device)
        stop = n - n % c.batch_size if c.drop_last else n
        if stop == 0:
            raise ValueError(f"drop_last with batch_size={c.batch_size} leaves no batch of the "
                             f"{n} training samples")
        return list(order[:stop].split(c.batch_size))[: c.max_batches]

    def _model_for(self, batch: Batch) -> torch.nn.Module:
        """``step_model`` for full batches; the plain module for an epoch's partial last batch,
        which would cost a compilation of its own for one step an epoch."""
        return self.step_model if len(batch.inputs) == self.config.batch_size else self.model

    def _step(self, batch: Batch) -> ObjectiveOutput:
        """One optimisation step on ``batch``, the encoder's passes through ``step_model``; an
        objective with its own update order (``train_step``: MCLRec) runs it, given that
        model, the optimizer and the autocast context."""
        model = self._model_for(batch)
        custom = getattr(self.objective, "train_step", None)
        if custom is not None:
            return custom(model, batch, self.generator, self.optimizer, self._autocast)
        with self._autocast():
            if self.ddp is None:
                out = self.objective(model, batch, self.generator)
            else:  # the global batch; this process computes its rows, losses are shares
                out = self._ddp_step(batch, self.generator)
        # DDP averages gradients over the processes: scale the share back (rec/ddp.py)
        loss = out.loss if self.ddp is None else out.loss * self.ddp.world
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return out

    def train_batch(self, idx: torch.Tensor) -> ObjectiveOutput:
        """One step on the training samples ``idx`` (a batch of ``_batches``): the same-target
        partners drawn, the step taken, the contrastive views added to the epoch's statistics
        (under DDP: the global batch's). Nothing is read back to the host."""
        positives = None
        if self.objective.needs_positives:
            positives = self.train_inputs[self.same_target.sample(idx, self.generator)]
        rows = None if self.ddp is None else self.ddp.rows(len(idx))
        batch = Batch(self.train_inputs[idx], self.train_targets[idx], positives, idx, rows,
                      self.ddp)
        out = self._step(batch)
        if out.views is not None:
            views = out.views
            if self.ddp is not None:  # the statistics of the global batch
                views = [self.ddp.gather(v, len(idx)) for v in views]
            self.stats.update(*views)
        return out

    def train_epoch(self) -> dict:
        """One pass over the training data; returns the epoch's mean loss parts etc.
        (the only host syncs are at the end)."""
        self.model.train()
        self.objective.train()
        self.stats.reset()
        names: list[str] | None = None
        sums = torch.zeros((), device=self.device)  # loss and parts, summed over the steps
        k_sum = torch.zeros((), device=self.device)
        has_k = False
        batches = self._batches()
        bar = progress_bar(batches, desc=f"epoch {self.epoch + 1}", leave=False, mininterval=1.0,
                   disable=not (self.config.progress and self.is_main))
        for idx in bar:
            out = self.train_batch(idx)
            logged = {"loss": out.loss.detach(), **out.parts}
            if names is None:
                names = list(logged)
            elif list(logged) != names:
                raise RuntimeError(f"the objective logged {list(logged)} after {names}")
            sums = sums + torch.stack([value.float() for value in logged.values()])
            if out.k is not None:  # the same on every process: not a share
                k_sum = k_sum + out.k.detach().float().mean()
                has_k = True
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ddp is not None:  # the processes' shares add up to the batch's terms
            sums = self.ddp.all_reduce(sums)
        # The epoch's one transfer of the logged values.
        means = (torch.cat([sums, k_sum[None]]) / len(batches)).tolist()
        row = dict(zip(names, means[:-1]))
        row["k"] = means[-1] if has_k else None
        if self.stats.num_batches:
            row["k_stat_pooled"] = self.stats.percentile("pooled")
            row["k_stat_batch_mean"] = self.stats.percentile("batch_mean")
            if self.config.record_histograms:
                row["neg_sim_hist"] = self.stats.histogram(HISTOGRAM_BINS)
        return row

    @torch.no_grad()
    def evaluate(self, which: str, state: dict | None = None) -> dict[str, float]:
        """Full-ranking metrics on ``"valid"`` or ``"test"`` (with ``state``'s weights, if
        given; the live weights are restored afterwards)."""
        live = copy.deepcopy(self.model.state_dict()) if state is not None else None
        if state is not None:
            self.model.load_state_dict(state)
        self.model.eval()
        if which not in self._eval_tensors:  # moved to the device once, not every epoch
            self._eval_tensors[which] = tuple(t.to(self.device)
                                              for t in self.split.eval_tensors(which))
        inputs, targets = self._eval_tensors[which]
        with self._autocast():  # the encoder only: SASRec.score keeps the logits in float32
            metrics = evaluate_full_ranking(
                self.model.score, inputs, targets, batch_size=self.config.eval_batch_size,
                device=self.device,
                history=self.split.history(which) if self.config.mask_history else None,
                ties=self.config.ties,
            )
        if live is not None:
            self.model.load_state_dict(live)
        return metrics

    @torch.no_grad()
    def geometry(self) -> dict[str, float]:
        """Uniformity and alignment of the fixed held-out sequences and their same-target
        partners, in eval mode: Wang & Isola's form (squared distances of L2-normalised
        representations) and the released ``decompose`` form (unsquared, raw)."""
        self.model.eval()
        z = self.model(self.train_inputs[self.holdout.to(self.device)]).float()
        zp = self.model(self.train_inputs[self.holdout_partner.to(self.device)]).float()
        return {
            "uniformity": float(uniformity(z)),
            "alignment": float(alignment(z, zp)),
            "uniformity_decompose": float(uniformity(z, squared=False, normalize=False)),
            "alignment_decompose": float(alignment(z, zp, alpha=1.0, normalize=False)),
        }

    def fit(self) -> dict:
        """Train until ``epochs`` or early stopping, then test the best epoch's weights."""
        c = self.config
        bar = progress_bar(total=c.epochs, initial=self.epoch, desc=c.method, unit="epoch",
                   disable=not (c.progress and self.is_main))
        while self.epoch < c.epochs and self.bad_epochs < c.patience:
            start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]  # before the scheduler steps
            row = {"epoch": self.epoch + 1, **self.train_epoch(), "lr": lr}
            if not math.isfinite(row["loss"]):
                # Checked once per epoch (a per-step check would sync with the device); the
                # last checkpoint still holds the previous epoch.
                raise FloatingPointError(
                    f"epoch {row['epoch']}: the mean training loss is {row['loss']} "
                    f"(lr={lr}, amp={self.amp}); the checkpoint keeps epoch {self.epoch}"
                )
            row.update(self.geometry())
            row["valid"] = self.evaluate("valid")
            seconds = time.perf_counter() - start
            row["seconds"] = seconds
            self.train_seconds += seconds
            simthres = self.simthres
            if simthres is not None and "k_stat_pooled" in row:
                simthres.update(row[f"k_stat_{c.kstat_method}"])
            metric = row["valid"][c.stop_metric]
            if metric > self.best_metric:
                self.best_metric, self.best_epoch, self.bad_epochs = metric, self.epoch + 1, 0
                self.best_state = copy.deepcopy(self.model.state_dict())
            else:
                self.bad_epochs += 1
            self.history.append(row)
            self.epoch += 1
            self.save_checkpoint()
            bar.set_postfix(loss=f"{row['loss']:.4f}",
                            k="-" if row["k"] is None else f"{row['k']:.3f}",
                            ndcg10=f"{metric:.4f}", best=self.best_epoch, refresh=False)
            bar.update()
            if self.callback is not None:
                self.callback(row)
        bar.close()
        return self.results()

    def results(self) -> dict:
        """The results dict (``results.json``'s content) with test metrics of the best epoch."""
        config = self.config.to_dict()
        config["similarity"] = "cos" if self.config.normalize else "dot"
        if self.ddp is not None:
            config["processes"] = self.ddp.world
        best = self.history[self.best_epoch - 1]["valid"] if self.best_epoch else {}
        return {
            "method": self.config.method,
            "dataset": self.dataset,
            "preset": self.config.preset,
            "valid": best,
            "test": self.evaluate("test", self.best_state),
            "epochs": self.epoch,
            "train_seconds": self.train_seconds,
            "history": self.history,
            "config": config,
        }


def train(
    config: TrainConfig,
    split: LeaveOneOutSplit,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    dataset: str = "synthetic",
    callback: Callable[[dict], None] | None = None,
    cache_dir: str | Path | None = None,
    ddp: DataParallel | None = None,
) -> dict:
    """Train ``config.method`` on ``split`` and return the results dict.

    With ``out_dir`` a checkpoint is written atomically after every epoch; ``resume=True``
    continues from it. ``callback(row)`` sees each epoch's history row after its checkpoint.
    ``cache_dir`` holds derived data (RCL's weak positives; default ``out_dir/cache``).
    ``ddp``: train data-parallel (rec/ddp.py); every process of the group calls ``train``.
    """
    trainer = Trainer(config, split, out_dir, dataset=dataset, callback=callback,
                      cache_dir=cache_dir, ddp=ddp)
    if resume:
        trainer.resume()
    return trainer.fit()
