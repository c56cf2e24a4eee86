"""``MultiverseScheduler``: vLLM 0.32.0's V1 ``Scheduler`` with fork and merge.

The hooks below tell :class:`vllm_multiverse.tree.MultiverseState` what
vLLM did and apply what it decides to vLLM's queues and requests:

- every request has a :class:`Track` (its structure, positions, masks);
  each step's positions, masks and KV copies ride to the workers as one
  :class:`MultiverseStep` on the ``SchedulerOutput`` (``.multiverse``);
- fork: a request that samples a ``</Goal>`` opening Paths leaves
  ``running`` (parked, holding its blocks) and one branch request per Path
  starts on its blocks;
- a branch ends one step after its Path's tail token (that step computes
  the tail's KV; the token it samples is dropped), its blocks stashed by the
  tree until the merge;
- live text: while a client request's fork decodes, Path 1 (first in text
  order) reaches the client as it is sampled, nested Path 1s too, with its
  logprob rows; sampled requests without a seed get one, so that a Path
  decoded again repeats what was sent;
- merge: the text in order, cut where sequential decoding would stop; the
  parent adopts branch 1's blocks, Paths 2..N are copied after them, the
  Conclusion header follows and the parent resumes; the client gets what
  it has not been sent yet;
- sequential decoding (per request or engine option): no fork; the engine
  writes the control tokens into the one sequence and the attention backend
  masks the Paths from each other.
"""

from __future__ import annotations

import copy
import random
import time

from vllm.sampling_params import SamplingParams, SamplingType
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.sched.utils import check_stop
from vllm.v1.engine import EngineCoreOutputs
from vllm.v1.request import Request, RequestStatus

from vllm_multiverse.config import ADDITIONAL_CONFIG_KEY, MultiverseConfig
from vllm_multiverse.vllm032.log import init_logger
from vllm_multiverse.model_config import read_multiverse_config
from vllm_multiverse.tree import Act, Finish, MultiverseState, StopRule, Track, is_branch, pressure
from vllm_multiverse.vllm032 import check_vllm_version, metrics
from vllm_multiverse.vllm032.kv import VllmBlocks, check_kv_cache_config
from vllm_multiverse.vllm032.outputs import merged_output, rows_of, to_lists
from vllm_multiverse.vllm032.per_request import CLIENT_ARG

logger = init_logger(__name__)

SEQUENTIAL_ARG = "multiverse_sequential"  # per request, in SamplingParams.extra_args

_FINISH = {
    RequestStatus.FINISHED_STOPPED: Finish.STOPPED,
    RequestStatus.FINISHED_LENGTH_CAPPED: Finish.LENGTH,
    RequestStatus.FINISHED_ABORTED: Finish.ABORTED,
    RequestStatus.FINISHED_REPETITION: Finish.REPETITION,
}
_STATUS = {finish: status for status, finish in _FINISH.items()} | {Finish.ERROR: RequestStatus.FINISHED_ERROR}


def _flag(value) -> bool:
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
    def __init__(self, *args, **kwargs) -> None:
        check_vllm_version()
        super().__init__(*args, **kwargs)
        check_kv_cache_config(self.kv_cache_config)
        vllm_config = self.vllm_config
        info = read_multiverse_config(vllm_config.model_config.hf_config)
        if info is None:
            raise ValueError(f"{vllm_config.model_config.model} does not declare itself a Multiverse model")
        if not self.cache_config.enable_prefix_caching:
            raise ValueError("Multiverse decoding shares KV blocks through vLLM's prefix-cache machinery")
        self.mv_config = MultiverseConfig.from_dict((vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY))
        structure = self.mv_config.structure_config(info.positions)
        self.kv = VllmBlocks(self)
        self.mv = MultiverseState(info.tokens, structure, self.mv_config, self.kv)
        # Within one update_from_output only:
        self._to_fork: list[Request] = []
        self._extra_outputs: list[tuple[int, object]] = []
        self._written: dict[str, int] = {}  # request -> sampled tokens before the written ones
        # Requests whose runner copy needs the written text (Track.fix_from).
        self._to_fix: set[str] = set()
        self._step_logprobs = None  # (LogprobsLists, req_id_to_index) of the step
        # Client request -> tokens of its open fork's text already sent (live).
        self._live_sent: dict[str, int] = {}
        logger.info("Multiverse scheduler: %s, positions=%s", self.mv_config, structure.positions)

    # -- request intake -----------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id not in self.requests:
            extra = request.sampling_params.extra_args or {}
            self.mv.add(
                request.request_id,
                request.prompt_token_ids or [],
                sequential=_flag(extra.get(SEQUENTIAL_ARG, self.mv_config.sequential)),
                client=extra.get(CLIENT_ARG),
                seed=_paths_seed(request.sampling_params),
            )
        if not self.mv_config.prefix_caching:
            request.skip_reading_prefix_cache = True
        super().add_request(request)

    # -- scheduling ----------------------------------------------------------

    def schedule(self, *args, **kwargs):
        if self.mv.held:
            # Oldest first: each prepend goes to the front.
            for rid in reversed(self.mv.release_held(others_active=bool(self._active_roots()))):
                self.waiting.prepend_request(self.requests[rid])
        self._relieve_pressure()
        out = super().schedule(*args, **kwargs)
        if out.total_num_scheduled_tokens == 0 and self._blocked():
            # Nothing fits: finished branches and parked parents hold the KV
            # that waiting branches, launches or merges need. Give one tree's
            # memory back.
            self._give_back_memory()
        # num_computed_tokens is already advanced past the scheduled ones.
        requests = self.requests
        step = self.mv.step(out.num_scheduled_tokens, lambda rid: requests[rid].num_computed_tokens)
        if self._to_fix:
            self._send_fixes(step, out.num_scheduled_tokens)
        out.multiverse = step
        return out

    def _send_fixes(self, step, scheduled) -> None:
        for rid in [r for r in self._to_fix if r in scheduled or r not in self.mv.tracks]:
            self._to_fix.discard(rid)
            track = self.mv.tracks.get(rid)
            if track is not None and track.fix_from is not None:
                step.token_fixes[rid] = (track.fix_from, list(self.requests[rid].all_token_ids[track.fix_from :]))
                track.fix_from = None

    def _blocked(self) -> bool:
        if self._pause_state == PauseState.PAUSED_ALL:
            return False
        queued = self.waiting and self._pause_state == PauseState.UNPAUSED
        return bool(self.kv_holding_waiting or self.mv.forks or queued)

    def update_from_output(self, scheduler_output, model_runner_output):
        # Every branch that ran this step belongs to a fork open now.
        branches_ran = bool(self.mv.forks)
        if model_runner_output.logprobs is not None:
            self._step_logprobs = (model_runner_output.logprobs, model_runner_output.req_id_to_index)
        try:
            outputs = super().update_from_output(scheduler_output, model_runner_output)
        finally:
            self._step_logprobs = None
        if self._written:
            self._drop_written_rows(outputs)
        # The step that ran the merge copies is done.
        self.mv.copies.step_done()
        if self._to_fork:
            for parent in self._to_fork:
                self._fork(parent)
            self._to_fork = []
        if self.mv.forks:
            self.mv.launch_pending(self._start_branch)
            for fork in self.mv.ready_to_merge():
                self._merge(fork)
            self._send_live_text(outputs)
        if branches_ran:
            # Branch requests are the engine's own: the client never sees them.
            for eco in outputs.values():
                if eco.outputs:
                    eco.outputs = [o for o in eco.outputs if not is_branch(o.request_id)]
        if self._extra_outputs:
            extra, self._extra_outputs = self._extra_outputs, []
            for client, o in extra:
                outputs.setdefault(client, EngineCoreOutputs()).outputs.append(o)
        return outputs

    def _drop_written_rows(self, outputs) -> None:
        written, self._written = self._written, {}
        for eco in outputs.values():
            for o in eco.outputs:
                if o.new_logprobs is not None and o.request_id in written:
                    # vLLM sliced one row per token; written tokens have none.
                    n = written[o.request_id]
                    rows = rows_of(o.new_logprobs)[:n] + [None] * (len(o.new_token_ids) - n)
                    o.new_logprobs = to_lists(o.new_token_ids, rows, o.new_logprobs.logprob_token_ids.shape[1] - 1)

    # -- tokens -------------------------------------------------------------

    def _update_request_with_output(self, request, new_token_ids, is_stale=False):
        track = self.mv.tracks.get(request.request_id)
        if track is None:
            return super()._update_request_with_output(request, new_token_ids, is_stale)
        if track.draining:
            # The tail's KV is computed; the token sampled after it is not text.
            request.status = RequestStatus.FINISHED_STOPPED
            return [], True
        kept: list[int] = []
        if track.engine_due:
            # The engine acts next, not the model: the sampled token is dropped.
            track.engine_due = False
            ev = track.state.event
            if track.act(ev) is Act.FORK:
                self._to_fork.append(request)
                return kept, False
            return kept, self._write(request, track, ev.write, kept)
        stopped = False
        for tok in new_token_ids:
            request.append_output_token_ids(tok)
            kept.append(tok)
            ev = track.append(tok)
            if track.rows is not None:
                track.rows.append(self._sampled_row(request.request_id, len(kept) - 1))
            stopped = check_stop(request, self.max_model_len)
            if stopped:
                break
            if ev is None:
                continue
            act = track.act(ev)
            if act is None:
                continue
            if act is Act.FORK:
                self._to_fork.append(request)
            elif act is Act.END_PATH:
                track.draining = True
            else:
                stopped = self._write(request, track, ev.write, kept)
            break
        if track.fork is not None and track.fork.concurrency > 1:
            # Sampled by a branch beside its siblings; written headers are not.
            self.mv.stats["parallel_tokens"] += self._written.get(request.request_id, len(kept))
        return kept, stopped

    def _sampled_row(self, request_id: str, i: int):
        lists, index = self._step_logprobs
        return rows_of(lists.slice_request(index[request_id], i + 1))[i]

    def _write(self, request: Request, track: Track, tokens, kept: list[int]) -> bool:
        """Append engine-written tokens (the sequential layer's headers);
        True if that reached the length limit. They are never stop tokens."""
        self._written[request.request_id] = len(kept)
        if track.fix_from is None:
            track.fix_from = request.num_tokens
            self._to_fix.add(request.request_id)
        for tok in tokens:
            request.append_output_token_ids(tok)
            kept.append(tok)
            track.append(tok, written=True)
            if track.rows is not None:
                track.rows.append(None)
            if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
                request.status = RequestStatus.FINISHED_LENGTH_CAPPED
                return True
        return False

    # -- fork ---------------------------------------------------------------

    def _fork(self, parent: Request) -> None:
        sp = parent.sampling_params
        budget = min(parent.max_tokens - parent.num_output_tokens, self.max_model_len - parent.num_tokens)
        rule = StopRule.of(budget, sp.stop_token_ids or (), sp.eos_token_id, sp.ignore_eos)
        fork = self.mv.fork(parent.request_id, rule, keep_rows=sp.logprobs is not None)
        self.running.remove(parent)
        logger.debug("fork %s at token %d into %d Paths", parent.request_id, parent.num_tokens - 1, fork.num_paths)

    def _start_branch(self, fork, k: int, branch_id: str, header) -> bool:
        parent = self.requests[fork.parent]
        # Shallow: a branch only reassigns fields, and a deep copy of large
        # extra_args (a replayed transcript) costs more than the step.
        sp = copy.copy(parent.sampling_params)
        sp.max_tokens = max(1, fork.rule.budget - len(header))
        sp.prompt_logprobs = None
        seed = self.mv.tracks[fork.parent].path_seed(fork, k)
        if seed is not None:
            sp.seed = seed
        child = Request(
            branch_id,
            list(parent.all_token_ids) + list(header),
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
        if not self.kv.share_prefix(parent.request_id, child, computed):
            return False
        child.num_computed_tokens = computed
        self.requests[branch_id] = child
        self._enqueue_waiting_request(child)
        return True

    # -- memory pressure ----------------------------------------------------

    def _active_roots(self) -> list[str]:
        """Root requests holding KV: running, or parked at a fork."""
        tracks = self.mv.tracks
        roots = {tracks[r.request_id].root: None for r in self.running if r.request_id in tracks}
        roots.update((f.root, None) for f in self.mv.forks.values())
        return list(roots)

    def _candidates(self, roots) -> list[pressure.Candidate]:
        req = self.requests
        return self.mv.candidates(roots, lambda r: req[r].priority, lambda r: req[r].arrival_time)

    def _relieve_pressure(self) -> None:
        if not self.mv.forks:
            return
        while self.kv.blocks_short(self.running) > 0:
            roots = self._active_roots()
            if len(roots) < 2:
                return
            self._preempt_tree(pressure.victim(self._candidates(roots), self.policy.value).root)

    def _give_back_memory(self) -> None:
        roots = self._active_roots()
        if len(roots) >= 2:
            self._preempt_tree(pressure.victim(self._candidates(roots), self.policy.value).root)
            return
        branches = self.mv.roll_back_newest_fork()
        if branches is not None:
            self.finish_requests(branches, RequestStatus.FINISHED_ABORTED)
            logger.debug("KV exhausted: a fork rolled back, its Paths one at a time")

    def _preempt_tree(self, root: str) -> None:
        request = self.requests[root]
        branches = self.mv.preempt_tree(root)
        if request in self.running:
            self.running.remove(request)
        self.finish_requests(branches, RequestStatus.FINISHED_ABORTED)
        self._preempt_request(request, time.monotonic())
        self.waiting.remove_request(request)
        self.mv.hold(root, request.arrival_time)
        logger.debug("KV exhausted: preempted the tree of %s", root)

    def _make_room(self, blocks: int, fork) -> bool:
        """Free blocks for a merge by preempting other trees, only if that
        is enough."""
        deficit = blocks - self.kv.num_free()
        if deficit <= 0:
            return True
        roots = [r for r in self._active_roots() if r != fork.root]

        def freeable(root: str) -> int:
            return self.kv.freeable(*self.mv.tree_holdings(root))

        victims = pressure.victims_for(deficit, self._candidates(roots), freeable, self.policy.value)
        if victims is None:
            return False
        for v in victims:
            self._preempt_tree(v.root)
        return self.kv.num_free() >= blocks

    # -- branch end ---------------------------------------------------------

    def _free_request_blocks(self, request: Request):
        if request.is_finished():
            finish = _FINISH.get(request.status, Finish.ERROR)
            if self.mv.finished(request.request_id, request.all_token_ids, finish, request.stop_reason):
                return  # a finished Path: the tree keeps its blocks for the merge
        return super()._free_request_blocks(request)

    # -- merge --------------------------------------------------------------

    def _merge(self, fork) -> None:
        """Merge a fork whose text is decided, once its KV fits."""
        need = self.mv.blocks_needed(fork)
        if need and not self._make_room(need, fork):
            return  # next step
        parent = self.requests[fork.parent]
        merge = self.mv.merge(fork)
        cut = merge.cut
        if merge.aborted:
            self.finish_requests(merge.aborted, RequestStatus.FINISHED_ABORTED)
        for tok in cut.tokens:
            parent.append_output_token_ids(tok)
        logger.debug("merge %s: %d Paths, %d tokens", parent.request_id, fork.num_paths, len(cut.tokens))
        if cut.end is not None:
            parent.status = _STATUS[cut.end.finish]
            parent.stop_reason = cut.end.stop_reason
            self._emit(parent, cut, finished=True)
            self._free_request(parent)
            return
        parent.num_computed_tokens = merge.num_computed
        self._emit(parent, cut, finished=False)
        parent.status = RequestStatus.PREEMPTED
        self._enqueue_waiting_request(parent)

    def _emit(self, parent: Request, cut, finished: bool) -> None:
        if self.mv.tracks[parent.request_id].fork is not None:
            return  # a branch: its text reaches the client with its own fork's merge
        sent = self._live_sent.pop(parent.request_id, 0)
        tokens, rows = cut.tokens[sent:], None if cut.rows is None else cut.rows[sent:]
        output = merged_output(parent, tokens, rows, finished, self._prefill_stats(parent))
        self._extra_outputs.append((parent.client_index, output))

    def _prefill_stats(self, request: Request):
        stats = request.take_prefill_stats()
        if stats is not None:
            stats.finalize(self.kv_cache_manager.estimate_cached_tokens(request))
        return stats

    # -- live text ----------------------------------------------------------

    def _send_live_text(self, outputs) -> None:
        for parent in list(self.mv.forks):
            request = self.requests.get(parent)
            if request is None or self.mv.tracks[parent].fork is not None:
                continue  # a branch's text is its client's live text
            sent = self._live_sent.get(parent, 0)
            new, rows = self.mv.live_text(parent, lambda b: self.requests[b].all_token_ids, sent)
            if not new:
                continue
            self._live_sent[parent] = sent + len(new)
            step = outputs.setdefault(request.client_index, EngineCoreOutputs()).outputs
            own = next((o for o in step if o.request_id == parent), None)
            if own is None:
                step.append(merged_output(request, new, rows, False, self._prefill_stats(request)))
                continue
            # It forked this step: its own tokens come first.
            if own.new_logprobs is not None:
                own_rows = rows_of(own.new_logprobs)
                width = own.new_logprobs.logprob_token_ids.shape[1] - 1
                own.new_logprobs = to_lists([*own.new_token_ids, *new], own_rows + rows, width)
            own.new_token_ids = [*own.new_token_ids, *new]

    # -- preemption, counts, stats ------------------------------------------

    def _preempt_request(self, request: Request, timestamp: float, *args, **kwargs) -> None:
        # vLLM recomputes it from its tokens; the recorded hidden ranges make
        # that recompute masked where the text holds merged Paths.
        super()._preempt_request(request, timestamp, *args, **kwargs)
        self.mv.preempted(request.request_id)

    def _root_counts(self) -> tuple[int, int, int]:
        """Client requests running (or parked at a fork), waiting with KV
        (a merged request), and queued without (held trees included)."""
        if not self.mv.forks:
            # No fork, so no branch: every request is its own root. vLLM asks
            # several times a step.
            return len(self.running), len(self.kv_holding_waiting), len(self.waiting) + len(self.mv.held)
        tracks = self.mv.tracks

        def roots(requests) -> set[str]:
            return {tracks[r.request_id].root if r.request_id in tracks else r.request_id for r in requests}

        running = roots(self.running) | {f.root for f in self.mv.forks.values()}
        holding = roots(self.kv_holding_waiting) - running
        queued = roots(self.waiting) - running - holding
        return len(running), len(holding), len(queued) + len(self.mv.held)

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

    def make_stats(self, *args, **kwargs):
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:
            metrics.attach(stats, metrics.scheduler_totals(self.mv.stats, self.mv.paths_per_fork))
        return stats

    # -- abort --------------------------------------------------------------

    def finish_requests(self, request_ids, finished_status):
        if request_ids is None:
            for rid in self.mv.clear():
                self.waiting.add_request(self.requests[rid])  # where vLLM looks for it
            self._live_sent.clear()
            done = super().finish_requests(None, finished_status)
        else:
            ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
            for rid in self.mv.unhold(ids):
                self.waiting.add_request(self.requests[rid])
            # A parent takes its whole tree of branches with it.
            done = super().finish_requests(self.mv.abort(ids), finished_status)
            for rid in ids:
                self._live_sent.pop(rid, None)
        return [r for r in done if not is_branch(r.request_id)]
