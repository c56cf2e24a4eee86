"""``MultiverseScheduler``: vLLM 0.32.0's V1 ``Scheduler`` with fork and merge.

The Multiverse policy (:mod:`vllm_multiverse.tree`) decides; these hooks tell
it what vLLM did and carry out what it returns on vLLM's queues, requests and
outputs:

- every request has a track (its tokens, structure, positions, masks); each
  step's positions, masks, written text and KV copies ride to the workers as
  one ``MultiverseStep`` (:mod:`.patches`: ``SchedulerOutput.multiverse``);
- a sampled token is the model's text, or the engine's turn
  (:mod:`~vllm_multiverse.tree.sampling`): a request that forks leaves
  ``running`` (parked, holding its blocks) and one branch request per Path
  starts on its blocks; a branch ends one step after its Path's tail token
  (that step computes the tail's KV; the token it samples is dropped), its
  blocks stashed by the tree until the merge; in sequential decoding the
  engine writes the control tokens into the one sequence;
- merge: the parent adopts branch 1's blocks, Paths 2..N are copied after
  them, the Conclusion header follows and the parent resumes; the client
  gets what it has not been sent yet (Path 1 reaches it live, with its
  logprobs; sampled requests without a seed get one, so that a Path decoded
  again repeats what was sent);
- memory pressure: whole trees are preempted and held, or a fork rolled back
  to one Path at a time (:mod:`~vllm_multiverse.tree.pressure`).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vllm.sampling_params import SamplingParams, SamplingType
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.sched.utils import check_stop
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import Request, RequestStatus

from vllm_multiverse.config import MultiverseConfig
from vllm_multiverse.model_config import read_model_declaration
from vllm_multiverse.tree import Finish, Fork, Limits, Trees, is_branch, lifecycle, live, merge, pressure, sampling
from vllm_multiverse.tree import step as tree_step
from vllm_multiverse.vllm032 import check_vllm_version, metrics, patches
from vllm_multiverse.vllm032.kv import VllmBlocks
from vllm_multiverse.vllm032.log import init_logger
from vllm_multiverse.vllm032.outputs import TokenLogprobs, merged_output, per_token, to_lists
from vllm_multiverse.vllm032.per_request import CLIENT_ARG
from vllm_multiverse.vllm032.validate import check_kv_cache_config

if TYPE_CHECKING:
    from vllm.v1.metrics.stats import PrefillStats, SchedulerStats
    from vllm.v1.outputs import ModelRunnerOutput

logger = init_logger(__name__)

SEQUENTIAL_ARG = "multiverse_sequential"  # per request, in SamplingParams.extra_args

_FINISH = {
    RequestStatus.FINISHED_STOPPED: Finish.STOPPED,
    RequestStatus.FINISHED_LENGTH_CAPPED: Finish.LENGTH,
    RequestStatus.FINISHED_ABORTED: Finish.ABORTED,
    RequestStatus.FINISHED_REPETITION: Finish.REPETITION,
}
_STATUS = {finish: status for status, finish in _FINISH.items()} | {Finish.ERROR: RequestStatus.FINISHED_ERROR}


def _flag(value: object) -> bool:
    # vllm_xargs from an HTTP client may carry "true"/"false" or 1/0.
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _paths_seed(sp: SamplingParams) -> int | None:
    """What a request's branch seeds derive from. An unseeded sampled
    request gets one drawn here: its Paths then sample as randomly as it
    would, and a Path decoded again (after a preemption or a roll-back)
    repeats the text already streamed."""
    if sp.sampling_type == SamplingType.GREEDY:
        return None
    return sp.seed if sp.seed is not None else random.getrandbits(63)


class MultiverseScheduler(Scheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_vllm_version()
        super().__init__(*args, **kwargs)
        check_kv_cache_config(self.kv_cache_config)
        vllm_config = self.vllm_config
        declaration = read_model_declaration(vllm_config.model_config.hf_config)
        if declaration is None:
            raise ValueError(f"{vllm_config.model_config.model} does not declare itself a Multiverse model")
        if not self.cache_config.enable_prefix_caching:
            raise ValueError("Multiverse decoding shares KV blocks through vLLM's prefix-cache machinery")
        self.mv_config = MultiverseConfig.of(vllm_config)
        structure = self.mv_config.structure_config(declaration.positions)
        self.block_ops = VllmBlocks(self)
        self.trees = Trees(declaration.tokens, structure, self.mv_config, self.block_ops, self.max_model_len)
        # Within one update_from_output only: parents that forked (they leave
        # ``running`` once vLLM's loop over it is done), the step's logprobs,
        # and per request the sampled tokens before the written ones.
        self._parked: list[Request] = []
        self._step_logprobs = None
        self._written: dict[str, int] = {}
        logger.info("Multiverse scheduler: %s, positions=%s", self.mv_config, structure.positions)

    # -- request intake -----------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id not in self.requests:
            sp = request.sampling_params
            extra = sp.extra_args or {}
            self.trees.add(
                request.request_id,
                request.prompt_token_ids or [],
                Limits.of(request.max_tokens, sp.stop_token_ids or (), sp.eos_token_id, sp.ignore_eos),
                sequential=_flag(extra.get(SEQUENTIAL_ARG, self.mv_config.sequential)),
                client=extra.get(CLIENT_ARG),
                seed=_paths_seed(sp),
                keep_logprobs=sp.logprobs is not None,
                priority=request.priority,
                arrival=request.arrival_time,
            )
        if not self.mv_config.prefix_caching:
            request.skip_reading_prefix_cache = True
        super().add_request(request)

    # -- scheduling ----------------------------------------------------------

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        trees = self.trees
        if trees.held:
            # Oldest first: each prepend goes to the front.
            for rid in reversed(pressure.release_held(trees, self._running_ids())):
                self.waiting.prepend_request(self.requests[rid])
        if trees.forks:
            while (root := pressure.to_relieve(trees, self._running_ids(), self.policy.value)) is not None:
                self._preempt_tree(root)
        out = super().schedule(throttle_prefills)
        if out.total_num_scheduled_tokens == 0 and self._blocked():
            self._give_back_memory()
        # num_computed_tokens is already advanced past the scheduled ones.
        requests = self.requests
        step = tree_step.build(trees, out.num_scheduled_tokens, lambda rid: requests[rid].num_computed_tokens)
        patches.send_step(out, step)
        return out

    def _running_ids(self) -> list[str]:
        return [r.request_id for r in self.running]

    def _blocked(self) -> bool:
        if self._pause_state == PauseState.PAUSED_ALL:
            return False
        queued = self.waiting and self._pause_state == PauseState.UNPAUSED
        return bool(self.kv_holding_waiting or self.trees.forks or queued)

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> dict[int, EngineCoreOutputs]:
        trees = self.trees
        # Every branch that ran this step belongs to a fork open now.
        branches_ran = bool(trees.forks)
        if model_runner_output.logprobs is not None:
            self._step_logprobs = (model_runner_output.logprobs, model_runner_output.req_id_to_index)
        try:
            outputs = super().update_from_output(scheduler_output, model_runner_output)
        finally:
            self._step_logprobs = None
        if self._written:
            self._drop_written_logprobs(outputs)
        # The step that ran the merge copies is done.
        trees.copies.step_done()
        if self._parked:
            for request in self._parked:
                self.running.remove(request)
            self._parked = []
        if trees.forks:
            self._launch()
            for fork in merge.ready(trees):
                self._merge(fork, outputs)
            self._send_live_text(outputs)
        if branches_ran:
            # Branch requests are the engine's own: the client never sees them.
            for client_outputs in outputs.values():
                if client_outputs.outputs:
                    client_outputs.outputs = [o for o in client_outputs.outputs if not is_branch(o.request_id)]
        return outputs

    def _drop_written_logprobs(self, outputs: dict[int, EngineCoreOutputs]) -> None:
        written, self._written = self._written, {}
        for client_outputs in outputs.values():
            for o in client_outputs.outputs:
                if o.new_logprobs is not None and o.request_id in written:
                    # vLLM sliced one entry per token; written tokens have none.
                    n = written[o.request_id]
                    entries = per_token(o.new_logprobs)[:n] + [None] * (len(o.new_token_ids) - n)
                    o.new_logprobs = to_lists(o.new_token_ids, entries, o.new_logprobs.logprob_token_ids.shape[1] - 1)

    # -- tokens -------------------------------------------------------------

    def _update_request_with_output(
        self, request: Request, new_token_ids: list[int], is_stale: bool = False
    ) -> tuple[list[int], bool]:
        rid = request.request_id
        trees = self.trees
        track = trees.tracks.get(rid)
        if track is None:
            return super()._update_request_with_output(request, new_token_ids, is_stale)
        kept: list[int] = []
        action = sampling.before_sample(trees, rid)
        if action is not None:
            return kept, self._carry_out(request, action, kept)
        for tok in new_token_ids:
            request.append_output_token_ids(tok)
            kept.append(tok)
            logprobs = self._sampled_logprobs(rid, len(kept) - 1) if track.logprobs is not None else None
            stopped = check_stop(request, self.max_model_len)
            action = sampling.on_token(trees, rid, tok, logprobs, stopped)
            if stopped:
                return kept, True
            if action is not None:
                return kept, self._carry_out(request, action, kept)
        return kept, False

    def _carry_out(self, request: Request, action: sampling.Action, kept: list[int]) -> bool:
        """What the policy decided for a request's token; True if it stopped."""
        if isinstance(action, sampling.Drained):
            request.status = RequestStatus.FINISHED_STOPPED
            return True
        if isinstance(action, sampling.Parked):
            self._parked.append(request)
            return False
        self._written[request.request_id] = len(kept)
        for tok in action.tokens:
            request.append_output_token_ids(tok)
            kept.append(tok)
        if action.capped:
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
        return action.capped

    def _sampled_logprobs(self, request_id: str, i: int) -> TokenLogprobs:
        lists, index = self._step_logprobs
        return per_token(lists.slice_request(index[request_id], i + 1))[i]

    # -- fork ---------------------------------------------------------------

    def _launch(self) -> None:
        for launches in lifecycle.launch_plan(self.trees):
            for launch in launches:
                if not self._start_branch(launch):
                    break  # its KV does not fit yet: next step
                lifecycle.launched(self.trees, launch)

    def _start_branch(self, launch: lifecycle.Launch) -> bool:
        parent = self.requests[launch.fork.parent]
        # Shallow: a branch only reassigns fields, and a deep copy of large
        # extra_args (a replayed transcript) costs more than the step.
        sp = copy.copy(parent.sampling_params)
        sp.max_tokens = launch.max_tokens
        sp.prompt_logprobs = None
        if launch.seed is not None:
            sp.seed = launch.seed
        child = Request(
            launch.branch_id,
            list(parent.all_token_ids) + list(launch.header),
            sp,
            None,
            client_index=parent.client_index,
            lora_request=parent.lora_request,
            cache_salt=parent.cache_salt,
            priority=parent.priority,
            block_hasher=parent._block_hasher,
        )
        child.skip_reading_prefix_cache = parent.skip_reading_prefix_cache
        computed = parent.num_computed_tokens
        if not self.block_ops.share_prefix(parent.request_id, child, computed):
            return False
        child.num_computed_tokens = computed
        self.requests[launch.branch_id] = child
        self._enqueue_waiting_request(child)
        return True

    # -- memory pressure ----------------------------------------------------

    def _give_back_memory(self) -> None:
        decision = pressure.to_give_back(self.trees, self._running_ids(), self.policy.value)
        if isinstance(decision, str):
            self._preempt_tree(decision)
        elif decision is not None:
            self.finish_requests(decision.branches, RequestStatus.FINISHED_ABORTED)
            logger.debug("KV exhausted: a fork rolled back, its Paths one at a time")

    def _preempt_tree(self, root: str) -> None:
        request = self.requests[root]
        branches = pressure.preempt_tree(self.trees, root)
        if request in self.running:
            self.running.remove(request)
        self.finish_requests(branches, RequestStatus.FINISHED_ABORTED)
        self._preempt_request(request, time.monotonic())
        self.waiting.remove_request(request)
        logger.debug("KV exhausted: preempted the tree of %s", root)

    # -- branch end ---------------------------------------------------------

    def _free_request_blocks(self, request: Request) -> None:
        if request.is_finished():
            finish = _FINISH.get(request.status, Finish.ERROR)
            if lifecycle.finished(self.trees, request.request_id, finish, request.stop_reason):
                return  # a finished Path: the tree keeps its blocks for the merge
        return super()._free_request_blocks(request)

    # -- merge --------------------------------------------------------------

    def _merge(self, fork: Fork, outputs: dict[int, EngineCoreOutputs]) -> None:
        """Merge a fork whose text is decided, once its KV fits."""
        need = merge.blocks_needed(self.trees, fork)
        if need:
            victims = pressure.room_for(self.trees, need, fork, self._running_ids(), self.policy.value)
            if victims is None:
                return  # next step
            for root in victims:
                self._preempt_tree(root)
        parent = self.requests[fork.parent]
        done = merge.merge(self.trees, fork)
        cut = done.cut
        if done.aborted:
            self.finish_requests(done.aborted, RequestStatus.FINISHED_ABORTED)
        for tok in cut.tokens:
            parent.append_output_token_ids(tok)
        logger.debug("merge %s: %d Paths, %d tokens", parent.request_id, fork.num_paths, len(cut.tokens))
        if cut.end is not None:
            parent.status = _STATUS[cut.end.finish]
            parent.stop_reason = cut.end.stop_reason
        self._emit(parent, done.client_text, outputs, finished=cut.end is not None)
        if cut.end is not None:
            self._free_request(parent)
            return
        parent.num_computed_tokens = done.num_computed
        parent.status = RequestStatus.PREEMPTED
        self._enqueue_waiting_request(parent)

    def _emit(
        self,
        request: Request,
        text: tuple[list[int], list | None] | None,
        outputs: dict[int, EngineCoreOutputs],
        finished: bool,
    ) -> None:
        if text is None:
            return
        tokens, logprobs = text
        output = merged_output(request, tokens, logprobs, finished, self._prefill_stats(request))
        outputs.setdefault(request.client_index, EngineCoreOutputs()).outputs.append(output)

    def _prefill_stats(self, request: Request) -> PrefillStats | None:
        stats = request.take_prefill_stats()
        if stats is not None:
            stats.finalize(self.kv_cache_manager.estimate_cached_tokens(request))
        return stats

    # -- live text ----------------------------------------------------------

    def _send_live_text(self, outputs: dict[int, EngineCoreOutputs]) -> None:
        for rid, new, logprobs in live.new_live_text(self.trees):
            request = self.requests[rid]
            step = outputs.setdefault(request.client_index, EngineCoreOutputs()).outputs
            own = next((o for o in step if o.request_id == rid), None)
            if own is None:
                step.append(merged_output(request, new, logprobs, False, self._prefill_stats(request)))
            else:
                _append_to(own, new, logprobs)

    # -- preemption, counts, stats ------------------------------------------

    def _preempt_request(self, request: Request, timestamp: float, *args: Any, **kwargs: Any) -> None:
        # vLLM recomputes it from its tokens; the recorded hidden ranges make
        # that recompute masked where the text holds merged Paths.
        super()._preempt_request(request, timestamp, *args, **kwargs)
        self.trees.preempted(request.request_id)

    def _root_counts(self) -> tuple[int, int, int]:
        """Client requests running (or parked at a fork), waiting with KV
        (a merged request), and queued without (held trees included)."""
        trees = self.trees
        if not trees.forks:
            # No fork, so no branch: every request is its own root. vLLM asks
            # several times a step.
            return len(self.running), len(self.kv_holding_waiting), len(self.waiting) + len(trees.held)
        tracks = trees.tracks

        def roots(requests: Iterable[Request]) -> set[str]:
            return {tracks[r.request_id].root if r.request_id in tracks else r.request_id for r in requests}

        running = roots(self.running) | {f.root for f in trees.forks.values()}
        holding = roots(self.kv_holding_waiting) - running
        queued = roots(self.waiting) - running - holding
        return len(running), len(holding), len(queued) + len(trees.held)

    def get_request_counts(self) -> tuple[int, int]:
        running, holding, queued = self._root_counts()
        return running, holding + queued

    def get_num_unfinished_requests(self) -> int:
        if self._pause_state == PauseState.PAUSED_ALL:
            return 0
        running, holding, queued = self._root_counts()
        if self._pause_state == PauseState.PAUSED_NEW:
            return running + holding  # in flight drains; queued stays queued
        return running + holding + queued

    def make_stats(self, *args: Any, **kwargs: Any) -> SchedulerStats | None:
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:
            patches.attach_totals(stats, metrics.scheduler_totals(self.trees.stats, self.trees.paths_per_fork))
        return stats

    # -- abort --------------------------------------------------------------

    def finish_requests(
        self, request_ids: str | Iterable[str] | None, finished_status: RequestStatus
    ) -> list[Request]:
        trees = self.trees
        if request_ids is None:
            for rid in lifecycle.abort_all(trees):
                self.waiting.add_request(self.requests[rid])  # where vLLM looks for it
            done = super().finish_requests(None, finished_status)
        else:
            ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
            for rid in pressure.unhold(trees, ids):
                self.waiting.add_request(self.requests[rid])
            # A parent takes its whole tree of branches with it.
            done = super().finish_requests(lifecycle.abort(trees, ids), finished_status)
        return [r for r in done if not is_branch(r.request_id)]


def _append_to(output: EngineCoreOutput, tokens: list[int], logprobs: list | None) -> None:
    """A request that forked this step: its own tokens come first."""
    if output.new_logprobs is not None:
        own = per_token(output.new_logprobs)
        width = output.new_logprobs.logprob_token_ids.shape[1] - 1
        output.new_logprobs = to_lists([*output.new_token_ids, *tokens], own + logprobs, width)
    output.new_token_ids = [*output.new_token_ids, *tokens]
