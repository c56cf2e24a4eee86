"""What the trees still hold, for tests (engine and fake engine alike)."""

from __future__ import annotations

from vllm_multiverse.tree import Trees


def leftovers(trees: Trees) -> dict[str, int]:
    """What the trees still keep (empty once no request is left)."""
    sizes = {
        "tracks": len(trees.tracks),
        "forks": len(trees.forks),
        "held": len(trees.held),
        "copies": int(bool(trees.copies)),
        "to_fix": len(trees.to_fix),
        "live_sent": len(trees.live_sent),
    }
    return {k: v for k, v in sizes.items() if v}


def held_blocks(trees: Trees) -> list[list]:
    """Every block list the trees hold references on."""
    return [s for f in trees.forks.values() for s in f.stashes()] + trees.copies.holds()
