"""Sequential recommendation pipeline around the AdaptiveRec loss.

Small modules, each doing one thing: ``data`` (readers, k-core, leave-one-out split),
``synthetic`` (the embedded demo dataset), ``metrics`` (full-ranking metrics, uniformity,
alignment), ``model`` (SASRec), ``augment`` (sequence augmentations), ``simthres``
(statistical and learnable thresholds), ``objectives`` (the training losses of each method),
``train`` (the seeded, resumable training loop), ``ddp`` (its data-parallel form), ``plots`` and ``cli`` (the command line:
``adaptive-cl-train`` or ``python -m adaptive_cl.rec``).
"""
