"""The README's examples of the other contrastive setups run as written, and do what they say."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _examples() -> list[str]:
    start = README.index("\n## Other contrastive setups\n")
    section = README[start:README.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_an_example_per_setup():
    blocks = _examples()
    assert len(blocks) == 3  # CLIP / two-tower, MoCo queue, learnable temperature
    for block in blocks:  # "a five-line example": the imports plus at most five lines of use
        body = [line for line in block.splitlines() if line and not line.startswith(("import", "from"))]
        assert len(body) <= 5, block


def test_the_examples_run_and_give_what_they_promise():
    env: dict = {}
    two_tower, moco, tau = _examples()
    exec(two_tower, env)
    assert env["loss"].dim() == 0 and torch.isfinite(env["loss"]) and torch.isfinite(env["clip"])
    env = {}
    exec(moco, env)
    assert env["queue"].shape == (4096, 64) and torch.isfinite(env["loss"])
    env = {}
    exec(tau, env)
    assert env["logit_scale"].grad is not None and torch.isfinite(env["logit_scale"].grad)
