"""What the V1 hooks (``runner.py``) and the Model Runner V2 hooks
(``runner_v2.py``) share: the checks after the model is built and the
step's Multiverse data, which no step may arrive without."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm_multiverse.vllm032 import patches, validate

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

    from vllm_multiverse.tree import MultiverseStep


class MultiverseRunnerBase:
    # Set by the subclass for its platform: (kv_caches, copies) -> None.
    copy_kv_slots = None

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        self._multiverse_after_load()

    def _multiverse_after_load(self) -> None:
        """What the model's built attention layers decide (``load_model``,
        after vLLM's own)."""
        validate.check_attention_layers(self.vllm_config)

    @staticmethod
    def multiverse_step(scheduler_output: SchedulerOutput) -> MultiverseStep:
        step = patches.received_step(scheduler_output)
        if step is None:
            # Without its step data a step would decode with token-index
            # positions and without the merge's copies: wrong tokens, silently.
            raise RuntimeError(
                "Multiverse worker: a step arrived without its Multiverse step data "
                "(SchedulerOutput.multiverse), which the Multiverse scheduler sets on every step; "
                "the transport between scheduler and workers dropped it"
            )
        return step
