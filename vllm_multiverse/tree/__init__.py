"""The Multiverse policy over request trees, with no vLLM in it.

A client request is the root of a tree: at each Parallel block a request
forks into one branch request per Path, a branch may fork again, and every
fork merges back into its parent. :class:`Trees` (``registry.py``) holds the
state; one module per decision works on it: what a sampled token does
(``sampling.py``), a fork's life (``lifecycle.py``), a merge (``merge.py``),
what to preempt and when (``pressure.py``), the text a client sees while its
fork decodes (``live.py``), what a step tells the workers (``step.py``). They
return plain data the host carries out, and reach the KV block pool only
through :class:`BlockOps`. The vLLM 0.32 layer (:mod:`vllm_multiverse.vllm032`)
is the host in an engine; the unit tests' fake engine is the host there.
"""

from vllm_multiverse.tree.blocks import BlockOps
from vllm_multiverse.tree.fork import BRANCH_TAG, Fork, is_branch
from vllm_multiverse.tree.registry import Trees
from vllm_multiverse.tree.step import MultiverseStep
from vllm_multiverse.tree.text_order import BranchResult, Cut, End, Finish, StopRule, text_in_order
from vllm_multiverse.tree.track import Act, Limits, Track

__all__ = [
    "BRANCH_TAG",
    "Act",
    "BlockOps",
    "BranchResult",
    "Cut",
    "End",
    "Finish",
    "Fork",
    "Limits",
    "MultiverseStep",
    "StopRule",
    "Track",
    "Trees",
    "is_branch",
    "text_in_order",
]
