"""Shared fixtures: the `ci` world, generated once per test session."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray pretrained tag must fail fast, not retry for 47 s

import pytest

from clipsift import config
from clipsift.world.config import WorldConfig


@pytest.fixture(scope="session")
def ci_world(tmp_path_factory):
    """A freshly generated `ci`-preset world (pool, curated split, tasks, ground truth)."""
    from clipsift.world.generate import generate_world

    out = tmp_path_factory.mktemp("world") / "ci"
    cfg = config.load(WorldConfig, config.preset_path("world", "ci"), [f"out={out}"])
    return generate_world(cfg, progress=False)
