"""`clipsift world`: generate the embedded synthetic benchmark world."""
from __future__ import annotations

import json

from clipsift.world.config import WorldConfig

CONFIG = WorldConfig
GROUP = "world"
HELP = """Generate the embedded benchmark world: a candidate pool of image-text pairs with web-like
noise (img2dataset shards + DataComp metadata parquet), its ground truth, a curated split for the
reference CLIPs, and downstream zero-shot tasks in the clip_benchmark layout. Deterministic from
`seed`; a killed run resumes. Presets: ci (seconds), tiny (the demo), gpu (for a GPU machine).
Example: clipsift world --preset ci out=runs/world/ci"""


def main(cfg: WorldConfig, args) -> int:
    from clipsift.world.generate import generate_world

    out = generate_world(cfg)
    stats = json.loads((out / "stats.json").read_text())
    print(f"world written to {out}")
    print(json.dumps(stats, indent=1))
    return 0
