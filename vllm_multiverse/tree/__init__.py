"""The Multiverse state of request trees, with no vLLM in it.

A client request is the root of a tree: at each Parallel block a request
forks into one branch request per Path, a branch may fork again, and every
fork merges back into its parent. This package owns that state (tracks,
forks, branch results, the text order and its stop rules, the merge plan,
the KV references the tree holds, the choice of what to preempt) and reaches
the KV block pool only through :class:`BlockOps`. The vLLM 0.32 layer
(:mod:`vllm_multiverse.vllm032`) drives it from its scheduler and runner
hooks; the unit tests drive it with a fake block pool.
"""

from vllm_multiverse.tree.blocks import BlockOps
from vllm_multiverse.tree.fork import BRANCH_TAG, BranchResult, Fork, is_branch
from vllm_multiverse.tree.state import MultiverseState
from vllm_multiverse.tree.step import MultiverseStep
from vllm_multiverse.tree.text_order import Cut, End, Finish, StopRule, text_in_order
from vllm_multiverse.tree.track import Act, Track

__all__ = [
    "BRANCH_TAG",
    "Act",
    "BlockOps",
    "BranchResult",
    "Cut",
    "End",
    "Finish",
    "Fork",
    "MultiverseState",
    "MultiverseStep",
    "StopRule",
    "Track",
    "is_branch",
    "text_in_order",
]
