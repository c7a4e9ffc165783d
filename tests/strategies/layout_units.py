"""The unit a parameter should land in, read from a hand-written layout of module paths: the expectation
test_parts.py and test_strategies.py check the structural detection against (one copy for both)."""

from __future__ import annotations

import re


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def expected_unit(name: str, lay: dict, prefix: str = "") -> str | None:
    """The unit a parameter should land in, from module paths alone."""
    assert name.startswith(prefix), name
    n = name[len(prefix):]
    if any(_under(n, p) for p in lay["head"]):
        return "head"
    if any(_under(n, p) for p in lay["connector"]):
        return "connector"
    if lay["vision_blocks"]:
        m = re.match(re.escape(lay["vision_blocks"]) + r"\.(\d+)\.", n)
        if m:
            return f"vision.block.{m.group(1)}"
        if any(_under(n, p) for p in lay["vision_embeddings"]):
            return "vision.embeddings"
        if any(_under(n, p) for p in lay["vision_norm"]):
            return "vision.norm"
    m = re.match(re.escape(lay["blocks"]) + r"\.(\d+)\.", n)
    if m:
        return f"language.block.{m.group(1)}"
    if any(_under(n, p) for p in lay["embeddings"]):
        return "embeddings"
    if any(_under(n, p) for p in lay["norm"]):
        return "language.norm"
    return None
