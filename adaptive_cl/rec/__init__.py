"""Sequential recommendation pipeline around the AdaptiveRec loss.

The protocol (data, 5-core filter, leave-one-out split, full-ranking evaluation, early stopping,
SASRec, the objectives of SASRec, CL4SRec, DuoRec and AdaptiveRec) is written out in the README
("The pipeline's protocol"); each module's docstring states its own part.

Small modules, each doing one thing: ``data`` (readers, k-core, leave-one-out split),
``synthetic`` (the embedded demo dataset), ``metrics`` (full-ranking metrics, uniformity,
alignment), ``model`` (SASRec), ``augment`` (sequence augmentations), ``simthres``
(statistical and learnable thresholds), ``objectives`` (the training losses of each method;
RCL's and MCLRec's, with their weak-positive index and learnable augmenters, in ``rcl`` and
``mclrec``), ``train`` (the seeded, resumable training loop), ``ddp`` (its data-parallel form),
``atomic`` (files written whole or not at all: checkpoints, results, caches, figures),
``two_tower`` (two-tower retrieval: SASRec users against the item table, logQ, accidental hits
excluded, the adaptive threshold; ``examples/two_tower.py``), ``plots``
and ``cli`` (the command line: ``adaptive-cl-train`` or ``python -m adaptive_cl.rec``).
"""
