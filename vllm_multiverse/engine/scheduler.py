"""``MultiverseScheduler``: vLLM 0.32.0's V1 ``Scheduler`` with fork and merge.

- Every request carries a :class:`StructureState` over its tokens and the
  Multiverse position of each token; the positions of scheduled tokens ride
  to the workers on the ``SchedulerOutput`` (``mv_positions``).
- Fork: when a request samples a ``</Goal>`` that opens Paths, it is parked
  (out of ``running``, holding its blocks) and one branch request per
  Outline label starts, its prompt the parent's tokens plus the
  engine-written header, its KV the parent's blocks by reference (vLLM copies
  a partial last block on write).
- A branch ends after its Path's tail token: one more step computes the
  tail's KV, the token sampled there is dropped, and the branch's blocks are
  stashed (still referenced) until the merge.
- Merge: the parent adopts branch 1's blocks, the KV of Paths 2..N is copied
  token by token into fresh blocks in text order (``mv_kv_copies``, run by
  the worker before the next forward; the sources are freed after that
  step), the Conclusion header is appended, and the parent resumes with the
  whole text in order. Stop conditions and ``max_tokens`` apply in text
  order, as in the sequential reference.
- Masks: each token's hidden KV ranges (the structure rule's
  ``hidden_ranges``) are recorded as it is appended. A step that computes
  tokens with hidden ranges (a prompt holding Parallel blocks, a merged
  request recomputed after preemption, sequential decoding) sends them as
  rectangles (``mv_attn_masks``) for the attention backend's masked path;
  vLLM's own recompute after preemption is then exact, in one pass.
- Sequential decoding (a plugin option, or per request): no fork; the engine
  writes the control tokens into the one sequence, as the reference does,
  and every later Path is masked from its siblings.
"""

from __future__ import annotations

import time
from array import array
from collections import Counter
from dataclasses import dataclass, field

from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.sched.utils import check_stop
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import Request, RequestStatus

from vllm_multiverse import metrics
from vllm_multiverse.engine.attn_mask import Rect, rects_for
from vllm_multiverse.engine.config import ADDITIONAL_CONFIG_KEY, MultiverseConfig
from vllm_multiverse.engine.logprobs import Row, rows_of, to_lists
from vllm_multiverse.engine.vllm_compat import check_vllm_version
from vllm_multiverse.log import init_logger
from vllm_multiverse.model_config import read_multiverse_config
from vllm_multiverse.structure import EventKind, StructureState

logger = init_logger(__name__)

_NEVER_CACHE = 1 << 62  # num_cached_block sentinel: merged KV is never published
SEQUENTIAL_ARG = "multiverse_sequential"  # per request, in SamplingParams.extra_args
BRANCH_TAG = "\x1fmv"  # in branch request ids: "{parent}\x1fmv{block}.{path}"


def _flag(value) -> bool:
    # vllm_xargs from an HTTP client may carry "true"/"false" or 1/0.
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Track:
    """The Multiverse view of one request."""

    state: StructureState
    positions: array  # Multiverse position of every token, prompt included
    group: ForkGroup | None = None  # the fork this branch belongs to
    index: int = 0  # Path index in that fork
    draining: bool = False  # tail seen: one more step computes its KV
    # The tokens so far end where the engine acts (a </Goal>, or a Path's
    # tail in sequential text): it forks or writes after the prefill.
    engine_due: bool = False
    sequential: bool = False  # Paths one after another in this sequence
    # Token index -> KV ranges it must not see; only tokens that have any.
    hidden: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)

    def append(self, tok: int):
        ev = self.state.append(tok)
        hidden = self.state.hidden_ranges()
        if hidden:
            self.hidden[len(self.positions)] = tuple(hidden)
        self.positions.append(self.state.position)
        return ev


@dataclass
class BranchResult:
    request_id: str
    tokens: list[int]  # the Path's text tokens (the shared lead only for Path 1)
    num_written: int  # leading engine-written tokens of ``tokens``
    blocks: list  # KV blocks (group 0), still referenced


@dataclass
class ForkGroup:
    parent: Request
    block_uid: int
    depth: int
    root_id: str
    headers: tuple[tuple[int, ...], ...]
    prefix_len: int  # parent tokens through </Goal>
    lead_len: int
    budget: int  # output tokens the parent may still produce
    concurrency: int
    running: dict[int, Request] = field(default_factory=dict)
    pending: list[int] = field(default_factory=list)
    results: dict[int, BranchResult] = field(default_factory=dict)
    merging: bool = False  # queued for its merge


class MultiverseScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        check_vllm_version()
        super().__init__(*args, **kwargs)
        vllm_config = self.vllm_config
        info = read_multiverse_config(vllm_config.model_config.hf_config)
        if info is None:
            raise ValueError(
                f"{vllm_config.model_config.model} does not declare itself a Multiverse model "
                "(config.json has no 'multiverse' entry)"
            )
        self.mv_config = MultiverseConfig.from_dict(
            (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        )
        self.mv_tokens = info.tokens
        self.mv_structure = self.mv_config.structure_config(info.positions)
        if not self.cache_config.enable_prefix_caching:
            raise ValueError("Multiverse decoding shares KV blocks through vLLM's prefix-cache API")
        self.mv_tracks: dict[str, Track] = {}
        self.mv_groups: dict[str, ForkGroup] = {}  # parent request id -> its open fork
        self.mv_branches_per_root: dict[str, int] = {}
        self.mv_stats = {
            "forks": 0,
            "merges": 0,
            "fallbacks": 0,
            "rollbacks": 0,
            "parallel_tokens": 0,
            "preemptions": 0,
            "masked_tokens": 0,
        }
        self.mv_paths_per_fork: Counter[int] = Counter()
        self._to_fork: list[Request] = []
        self._to_merge: list[ForkGroup] = []
        self._pending_copies: list[tuple[int, int]] = []
        self._frees_after_copy: list[list] = []
        self._frees_after_step: list[list] = []
        self._extra_outputs: list[tuple[int, EngineCoreOutput]] = []
        # Sample logprobs of each branch's output tokens, for the merge.
        self._rows: dict[str, list[Row | None]] = {}
        # Requests that got engine-written tokens this step: how many sampled before them.
        self._written: dict[str, int] = {}
        # The runner keeps its own copy of each request's tokens and knows
        # only the sampled ones: from this index on, send it the written text.
        self._token_fixes: dict[str, int] = {}
        # Trees preempted for memory wait here, out of vLLM's waiting queue,
        # until a tree finishes: readmitted at once, one would take back the
        # blocks its elders need and fork again, and no tree would finish.
        self._held: list[tuple[int, Request]] = []  # (roots finished then, root)
        self._roots_finished = 0
        logger.info("Multiverse scheduler: %s, positions=%s", self.mv_config, self.mv_structure.positions)

    # -- request intake -----------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id not in self.mv_tracks:
            track = self._new_track(request.prompt_token_ids or [])
            extra = (request.sampling_params.extra_args or {}) if request.sampling_params else {}
            track.sequential = _flag(extra.get(SEQUENTIAL_ARG, self.mv_config.sequential))
            ev = track.state.event
            track.engine_due = ev is not None and (ev.kind is EventKind.FORK or bool(ev.write))
            self.mv_tracks[request.request_id] = track
        if not self.mv_config.prefix_caching:
            request.skip_reading_prefix_cache = True
        super().add_request(request)

    def _new_track(self, token_ids) -> Track:
        track = Track(StructureState(self.mv_tokens, self.mv_structure), array("q"))
        for tok in token_ids:
            track.append(tok)
        return track

    # -- scheduling ----------------------------------------------------------

    def schedule(self, *args, **kwargs):
        self._release_held()
        self._relieve_pressure()
        out = super().schedule(*args, **kwargs)
        if out.total_num_scheduled_tokens == 0 and (self.waiting or self.kv_holding_waiting or self.mv_groups):
            # Nothing fits: finished branches and parked parents hold the KV
            # that waiting branches, launches or merges need. Give one tree's
            # memory back.
            self._give_back_memory()
        positions: dict[str, int | list[int]] = {}
        masks: dict[str, list[Rect]] = {}
        for rid, n in out.num_scheduled_tokens.items():
            track = self.mv_tracks.get(rid)
            if track is None:
                continue
            end = self.requests[rid].num_computed_tokens  # already advanced
            start = end - n
            if track.hidden:
                rects = rects_for(track.hidden, start, end)
                if rects:
                    masks[rid] = rects
                    self.mv_stats["masked_tokens"] += n
            pos = track.positions[start:end]
            delta = start - pos[0]
            if all(p + delta == start + j for j, p in enumerate(pos)):
                if delta:
                    positions[rid] = delta  # the common case: one offset
            else:
                positions[rid] = pos.tolist()
        out.mv_positions = positions
        out.mv_attn_masks = masks
        fixes = {}
        for rid, start in list(self._token_fixes.items()):
            req = self.requests.get(rid)
            if req is None or req.is_finished():
                del self._token_fixes[rid]
            elif rid in out.num_scheduled_tokens:
                fixes[rid] = (start, list(req.all_token_ids[start:]))
                del self._token_fixes[rid]
        out.mv_token_fixes = fixes
        out.mv_kv_copies, self._pending_copies = self._pending_copies, []
        self._frees_after_step.extend(self._frees_after_copy)
        self._frees_after_copy = []
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        written, self._written = self._written, {}
        for eco in outputs.values():
            for o in eco.outputs:
                if o.new_logprobs is None:
                    continue
                if o.request_id in written:
                    # vLLM sliced one row per token; written tokens have none.
                    n = written[o.request_id]
                    rows = rows_of(o.new_logprobs)[:n]
                    rows += [None] * (len(o.new_token_ids) - n)
                    o.new_logprobs = to_lists(o.new_token_ids, rows, o.new_logprobs.logprob_token_ids.shape[1] - 1)
                if BRANCH_TAG in o.request_id:
                    self._rows.setdefault(o.request_id, []).extend(rows_of(o.new_logprobs))
        # The step that ran the merge copies is done: their sources can go.
        for blocks in self._frees_after_step:
            self.kv_cache_manager.block_pool.free_blocks(reversed(blocks))
        self._frees_after_step = []
        for parent in self._to_fork:
            self._fork(parent)
        self._to_fork = []
        self._launch_pending()
        waiting_merges = []
        for group in self._to_merge:
            if not self._merge(group):
                waiting_merges.append(group)  # no KV room yet; next step
        self._to_merge = waiting_merges
        # Branch requests are the engine's own: the client never sees them.
        for eco in outputs.values():
            if eco.outputs:
                eco.outputs = [o for o in eco.outputs if BRANCH_TAG not in o.request_id]
        extra, self._extra_outputs = self._extra_outputs, []
        for client, o in extra:
            outputs.setdefault(client, EngineCoreOutputs()).outputs.append(o)
        return outputs

    # -- tokens -------------------------------------------------------------

    def _update_request_with_output(self, request, new_token_ids, is_stale=False):
        track = self.mv_tracks.get(request.request_id)
        if track is None:
            return super()._update_request_with_output(request, new_token_ids, is_stale)
        if track.draining:
            # The tail's KV is computed; the token sampled after it is not text.
            request.status = RequestStatus.FINISHED_STOPPED
            return [], True
        if track.engine_due:
            # The engine writes next, not the model: the sampled token is dropped.
            track.engine_due = False
            ev = track.state.event
            if ev.kind is EventKind.FORK and not track.sequential:
                self._to_fork.append(request)
                return [], False
            kept: list[int] = []
            return kept, self._write(request, track, ev.write, kept)
        kept = []
        stopped = False
        for tok in new_token_ids:
            request.append_output_token_ids(tok)
            kept.append(tok)
            ev = track.append(tok)
            stopped = check_stop(request, self.max_model_len)
            if stopped:
                break
            if ev is None:
                continue
            if ev.kind is EventKind.FORK and not track.sequential:
                self._to_fork.append(request)
                break
            if track.group is not None and ev.block == track.group.block_uid:
                track.draining = True  # NEXT_PATH / CONCLUSION: this Path is done
                break
            stopped = self._write(request, track, ev.write, kept)
            break
        if track.group is not None and track.group.concurrency > 1:
            # Sampled by a branch beside its siblings; written headers are not.
            self.mv_stats["parallel_tokens"] += self._written.get(request.request_id, len(kept))
        return kept, stopped

    def _write(self, request: Request, track: Track, tokens, kept: list[int]) -> bool:
        """Append engine-written tokens (the sequential layer's headers);
        True if that reached the length limit. They are never stop tokens."""
        self._written[request.request_id] = len(kept)
        self._token_fixes.setdefault(request.request_id, request.num_tokens)
        for tok in tokens:
            request.append_output_token_ids(tok)
            kept.append(tok)
            track.append(tok)
            if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
                request.status = RequestStatus.FINISHED_LENGTH_CAPPED
                return True
        return False

    # -- fork ---------------------------------------------------------------

    def _fork(self, parent: Request) -> None:
        rid = parent.request_id
        track = self.mv_tracks[rid]
        ev = track.state.event
        root = self._root_id(parent)
        n = len(ev.branch_headers)
        live = self.mv_branches_per_root.get(root, 0)
        cfg = self.mv_config
        fallback = (
            not cfg.parallel
            or n > cfg.max_paths_per_fork
            or ev.depth > cfg.max_depth
            or live + n > cfg.max_branches_per_request
        )
        if fallback and cfg.parallel:
            self.mv_stats["fallbacks"] += 1
            logger.debug("fork of %s: %d Paths one at a time (caps)", rid, n)
        group = ForkGroup(
            parent=parent,
            block_uid=ev.block,
            depth=ev.depth,
            root_id=root,
            headers=ev.branch_headers,
            prefix_len=parent.num_tokens,
            lead_len=len(self.mv_tokens.path_header_lead),
            budget=parent.max_tokens - parent.num_output_tokens,
            concurrency=1 if fallback else n,
            pending=list(range(n)),
        )
        self.running.remove(parent)
        self.mv_groups[rid] = group
        self.mv_stats["forks"] += 1
        self.mv_paths_per_fork[n] += 1
        logger.debug("fork %s at token %d into %d Paths", rid, parent.num_tokens - 1, n)

    def _root_id(self, request: Request) -> str:
        track = self.mv_tracks[request.request_id]
        while track.group is not None:
            request = track.group.parent
            track = self.mv_tracks[request.request_id]
        return request.request_id

    def _launch_pending(self) -> None:
        for group in list(self.mv_groups.values()):
            while group.pending and not group.merging and len(group.running) < group.concurrency:
                if not self._launch(group, group.pending[0]):
                    break  # no KV room now; try again after the next step
                group.pending.pop(0)

    def _launch(self, group: ForkGroup, k: int) -> bool:
        parent = group.parent
        header = group.headers[k]
        sp = parent.sampling_params.clone()
        sp.max_tokens = max(1, group.budget - len(header))
        if sp.seed is not None:
            sp.seed = (sp.seed * 1_000_003 + group.block_uid * 1_009 + k + 1) % (1 << 63)
        bid = f"{parent.request_id}{BRANCH_TAG}{group.block_uid}.{k}"
        child = Request(
            bid,
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
        blocks = self.kv_cache_manager.get_blocks(parent.request_id).blocks
        shared = KVCacheBlocks(tuple(list(g[: _cdiv(computed, self.block_size)]) for g in blocks))
        if self.kv_cache_manager.allocate_slots(
            child, 0, num_new_computed_tokens=computed, new_computed_blocks=shared
        ) is None:
            return False
        child.num_computed_tokens = computed
        ptrack = self.mv_tracks[parent.request_id]
        track = Track(
            ptrack.state.fork(), array("q", ptrack.positions), group=group, index=k, hidden=dict(ptrack.hidden)
        )
        for tok in header:
            track.append(tok)
        self.mv_tracks[bid] = track
        self.requests[bid] = child
        self._enqueue_waiting_request(child)
        group.running[k] = child
        self.mv_branches_per_root[group.root_id] = self.mv_branches_per_root.get(group.root_id, 0) + 1
        return True

    # -- memory pressure ----------------------------------------------------
    #
    # vLLM preempts its newest running request when a step does not fit. For
    # a branch that frees little (its parked parent keeps its blocks) and the
    # tree may never finish, so the unit of preemption here is a whole tree:
    # a root request, its parked forks and all their branches, newest first.
    # A lone tree that does not fit runs its Paths one at a time instead.

    def _relieve_pressure(self) -> None:
        if not self.mv_groups:
            return
        while self._blocks_short() > 0:
            roots = self._active_roots()
            if len(roots) < 2:
                return
            self._preempt_tree(max(roots, key=lambda r: r.arrival_time))

    def _give_back_memory(self) -> None:
        roots = self._active_roots()
        if len(roots) >= 2:
            self._preempt_tree(max(roots, key=lambda r: r.arrival_time))
        else:
            self._roll_back_newest_fork()

    def _release_held(self) -> None:
        if not self._held:
            return
        if not self._active_roots():
            ready = self._held
        else:
            ready = [h for h in self._held if h[0] < self._roots_finished][:1]
        # Oldest first: each prepend goes to the front.
        for h in sorted(ready, key=lambda h: h[1].arrival_time, reverse=True):
            self._held.remove(h)
            self.waiting.prepend_request(h[1])

    def _blocks_short(self) -> int:
        """Blocks the running requests' next token each needs beyond the free
        ones (a prefill's further chunks are vLLM's to fit)."""
        mgr = self.kv_cache_manager.coordinator.single_type_managers[0]
        need = 0
        for req in self.running:
            have = len(mgr.req_to_blocks.get(req.request_id, ()))
            need += max(0, _cdiv(req.num_computed_tokens + 1, self.block_size) - have)
        return need - self.kv_cache_manager.block_pool.get_num_free_blocks()

    def _active_roots(self) -> list[Request]:
        """Root requests holding KV: running, or parked at a fork."""
        roots: dict[str, Request] = {}
        for req in list(self.running) + [g.parent for g in self.mv_groups.values()]:
            rid = self._root_id(req) if req.request_id in self.mv_tracks else req.request_id
            roots[rid] = self.requests[rid]
        return list(roots.values())

    def _preempt_tree(self, root: Request) -> None:
        group = self.mv_groups.get(root.request_id)
        if group is None:
            self.running.remove(root)
        else:
            del self.mv_groups[root.request_id]
            if group in self._to_merge:
                self._to_merge.remove(group)
            self._abort_branches(group)
        self._preempt_request(root, time.monotonic())
        self.waiting.remove_request(root)
        self._held.append((self._roots_finished, root))
        logger.debug("KV exhausted: preempted the tree of %s", root.request_id)

    def _abort_branches(self, group: ForkGroup) -> None:
        """Drop every branch of a fork and the KV of the Paths done so far."""
        children = [c.request_id for c in group.running.values()]
        self._drop_results(group)
        group.running.clear()
        group.pending.clear()
        self.finish_requests(children, RequestStatus.FINISHED_ABORTED)

    def _drop_results(self, group: ForkGroup) -> None:
        for res in group.results.values():
            self.kv_cache_manager.block_pool.free_blocks(reversed(res.blocks))
            self._rows.pop(res.request_id, None)
        group.results.clear()

    def _roll_back_newest_fork(self) -> None:
        """Drop the work of the newest fork that has any, to run its Paths one
        at a time later. Branch tokens are a function of the branch (greedy,
        or its own seed), so running them again gives the same text."""
        for rid in reversed(list(self.mv_groups)):
            group = self.mv_groups[rid]
            if group.merging or (not group.running and not group.results):
                continue
            self._abort_branches(group)
            group.pending = list(range(len(group.headers)))
            group.concurrency = 1
            self.mv_stats["rollbacks"] += 1
            logger.debug("KV exhausted: fork of %s rolled back, Paths one at a time", rid)
            return

    # -- branch end ---------------------------------------------------------

    def _free_request_blocks(self, request: Request):
        if not request.is_finished():  # preemption: vLLM recomputes it later
            return super()._free_request_blocks(request)
        track = self.mv_tracks.pop(request.request_id, None)
        group = track.group if track is not None else None
        if track is not None and BRANCH_TAG not in request.request_id:
            self._roots_finished += 1
        if group is None or request.status == RequestStatus.FINISHED_ABORTED:
            return super()._free_request_blocks(request)
        k = track.index
        start = group.prefix_len if k == 0 else group.prefix_len + group.lead_len
        written = len(group.headers[k]) - (0 if k == 0 else group.lead_len)
        group.results[k] = BranchResult(
            request_id=request.request_id,
            tokens=list(request.all_token_ids[start:]),
            num_written=written,
            blocks=self.kv_cache_manager.pop_blocks_for_free(request),
        )
        group.running.pop(k, None)
        self.mv_branches_per_root[group.root_id] -= 1
        if not group.merging and self._text_in_order(group) is not None:
            group.merging = True
            self._to_merge.append(group)

    # -- merge --------------------------------------------------------------

    def _text_in_order(self, group: ForkGroup):
        """The Paths' text in order, cut where sequential decoding would stop:
        (tokens, finish status or None, stop reason), or None while a Path
        that has not ended yet could still be part of it."""
        sp = group.parent.sampling_params
        stops = set(sp.stop_token_ids or ())
        if sp.eos_token_id is not None and not sp.ignore_eos:
            stops.add(sp.eos_token_id)
        text: list[int] = []
        for k in range(len(group.headers)):
            res = group.results.get(k)
            if res is None:
                return None
            for j, tok in enumerate(res.tokens):
                text.append(tok)
                if j >= res.num_written and tok in stops:
                    return text, RequestStatus.FINISHED_STOPPED, (None if tok == sp.eos_token_id else tok)
                if len(text) >= group.budget:
                    return text, RequestStatus.FINISHED_LENGTH_CAPPED, None
        for tok in self.mv_tokens.conclusion_header:
            text.append(tok)
            if len(text) >= group.budget:
                return text, RequestStatus.FINISHED_LENGTH_CAPPED, None
        return text, None, None

    def _merge(self, group: ForkGroup) -> bool:
        """Merge a fork whose text is decided; False if the KV does not fit yet."""
        parent = group.parent
        rid = parent.request_id
        text, finish, stop_reason = self._text_in_order(group)
        if finish is None and not self._make_room(self._merge_blocks_needed(group)):
            return False
        rows = self._rows_in_order(group)[: len(text)]
        del self.mv_groups[rid]
        track = self.mv_tracks[rid]
        if finish is not None:
            parent.stop_reason = stop_reason
            # Later Paths are past the end of the text: drop them.
            group.pending.clear()
            self.finish_requests([c.request_id for c in group.running.values()], RequestStatus.FINISHED_ABORTED)
        for tok in text:
            parent.append_output_token_ids(tok)
            track.append(tok)
        self.mv_stats["merges"] += 1
        logger.debug("merge %s: %d Paths, %d tokens", rid, len(group.headers), len(text))
        if finish is not None or parent.num_tokens >= self.max_model_len:
            parent.status = finish or RequestStatus.FINISHED_LENGTH_CAPPED
            self._drop_results(group)
            self._emit(parent, text, rows, finished=True)
            # Not popping the track here: for a Path that ends in its nested
            # merge, _free_request_blocks hands its text to its own fork
            # (without it that fork waited on the Path forever).
            self._free_request(parent)
            return True
        self._splice_kv(group)
        self._emit(parent, text, rows, finished=False)
        parent.status = RequestStatus.PREEMPTED
        self._enqueue_waiting_request(parent)
        return True

    @staticmethod
    def _merged_lengths(group: ForkGroup) -> tuple[int, int]:
        """Tokens with KV after the merge: through Path 1 (branch 1's own
        blocks), and through the last Path (copies included)."""
        n1 = group.prefix_len + len(group.results[0].tokens)
        total = n1 + sum(len(group.results[k].tokens) for k in range(1, len(group.headers)))
        return n1, total

    def _merge_blocks_needed(self, group: ForkGroup) -> int:
        n1, total = self._merged_lengths(group)
        return max(0, _cdiv(total, self.block_size) - _cdiv(n1, self.block_size))

    def _make_room(self, blocks: int) -> bool:
        """Free blocks for a merge by preempting the newest running requests."""
        pool = self.kv_cache_manager.block_pool
        for req in reversed(list(self.running)):
            if pool.get_num_free_blocks() >= blocks:
                break
            self.running.remove(req)
            self._preempt_request(req, time.monotonic())
        return pool.get_num_free_blocks() >= blocks

    def _splice_kv(self, group: ForkGroup) -> None:
        """Give the parent branch 1's blocks, and copy Paths 2..N after them."""
        B = self.block_size
        parent = group.parent
        r1 = group.results[0]
        n1, total = self._merged_lengths(group)
        own = r1.blocks[: _cdiv(n1, B)]
        spare = r1.blocks[_cdiv(n1, B):]
        fresh = self.kv_cache_manager.block_pool.get_new_blocks(max(0, _cdiv(total, B) - len(own)))
        table = own + fresh
        mgr = self.kv_cache_manager.coordinator.single_type_managers[0]
        old = mgr.req_to_blocks[parent.request_id]
        mgr.req_to_blocks[parent.request_id] = table
        mgr.num_cached_block[parent.request_id] = _NEVER_CACHE
        self.kv_cache_manager.block_pool.free_blocks(reversed(list(old) + list(spare)))

        def slot(blocks, i: int) -> int:
            return blocks[i // B].block_id * B + i % B

        dst = n1
        src_start = group.prefix_len + group.lead_len
        for k in range(1, len(group.headers)):
            res = group.results[k]
            for j in range(len(res.tokens)):
                self._pending_copies.append((slot(res.blocks, src_start + j), slot(table, dst + j)))
            dst += len(res.tokens)
            self._frees_after_copy.append(res.blocks)
        parent.num_computed_tokens = total

    def _rows_in_order(self, group: ForkGroup) -> list[Row | None]:
        """The Paths' logprob rows in text order, None for written tokens."""
        rows: list[Row | None] = []
        for k in range(len(group.headers)):
            res = group.results.get(k)
            if res is None:
                break
            own = self._rows.pop(res.request_id, [])
            n = len(res.tokens) - res.num_written
            if len(own) != n:  # no logprobs asked for
                own = [None] * n
            rows += [None] * res.num_written + own
        return rows + [None] * len(self.mv_tokens.conclusion_header)

    def _emit(self, parent: Request, tokens: list[int], rows: list[Row | None], finished: bool) -> None:
        num_logprobs = parent.sampling_params.logprobs
        if self.mv_tracks[parent.request_id].group is not None:
            # A branch's merged text reaches the client with its own fork's merge.
            if num_logprobs is not None:
                self._rows.setdefault(parent.request_id, []).extend(rows)
            return
        self._extra_outputs.append(
            (
                parent.client_index,
                EngineCoreOutput(
                    request_id=parent.request_id,
                    new_token_ids=tokens,
                    new_logprobs=None if num_logprobs is None else to_lists(tokens, rows, num_logprobs),
                    finish_reason=parent.get_finished_reason() if finished else None,
                    stop_reason=parent.stop_reason,
                ),
            )
        )

    # -- preemption -----------------------------------------------------------

    def _preempt_request(self, request: Request, timestamp: float, *args, **kwargs) -> None:
        # vLLM recomputes it from its tokens; the recorded hidden ranges make
        # that recompute masked where the text holds merged Paths.
        super()._preempt_request(request, timestamp, *args, **kwargs)
        self.mv_stats["preemptions"] += 1
        track = self.mv_tracks.get(request.request_id)
        if track is not None:
            # A parent preempted at its fork forks again once recomputed.
            ev = track.state.event
            track.engine_due = ev is not None and ev.kind is EventKind.FORK and not track.sequential

    def make_stats(self, *args, **kwargs):
        stats = super().make_stats(*args, **kwargs)
        if stats is not None:
            metrics.attach(stats, metrics.scheduler_totals(self.mv_stats, self.mv_paths_per_fork))
        return stats

    def get_num_unfinished_requests(self) -> int:
        # Parents parked at a fork and held trees are in neither queue.
        return super().get_num_unfinished_requests() + len(self.mv_groups) + len(self._held)

    # -- abort --------------------------------------------------------------

    def finish_requests(self, request_ids, finished_status):
        if request_ids is None:
            for _, r in self._held:
                self.waiting.add_request(r)
            self._held.clear()
            return super().finish_requests(None, finished_status)
        ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
        for h in [h for h in self._held if h[1].request_id in ids]:
            self._held.remove(h)
            self.waiting.add_request(h[1])  # where vLLM's abort looks for it
        # A parent takes its whole tree of branches with it.
        todo = list(ids)
        while todo:
            group = self.mv_groups.pop(todo.pop(), None)
            if group is None:
                continue
            if group in self._to_merge:
                self._to_merge.remove(group)
            for k, child in group.running.items():
                ids.add(child.request_id)
                todo.append(child.request_id)
            self._drop_results(group)
            group.pending.clear()
            if group.parent not in self.running:
                # Parked: finish_requests looks for it in the queues.
                self.running.append(group.parent)
        for rid in ids:
            self._rows.pop(rid, None)
            track = self.mv_tracks.get(rid)
            if track is not None and track.group is not None:
                self.mv_branches_per_root[track.group.root_id] = max(
                    0, self.mv_branches_per_root.get(track.group.root_id, 1) - 1
                )
                track.group = None
        done = super().finish_requests(ids, finished_status)
        for r in done:
            self.mv_tracks.pop(r.request_id, None)
        return done
