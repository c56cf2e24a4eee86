"""Live text: while a client request's fork decodes, the text that text
order has decided already reaches the client. That is Path 1 (first in text
order, with its header) as far as it has been decoded, and inside it Path 1
of Path 1's own fork, and so on; what follows Path 1 is decided at the merge
(:mod:`.merge` sends the rest)."""

from __future__ import annotations

from vllm_multiverse.tree.registry import Trees


def live_text(trees: Trees, root: str, sent: int = 0) -> tuple[list[int], list | None]:
    """The decided text after ``root``'s own tokens, from token ``sent`` of it
    on, with its logprobs if the client asked for them (None where the
    engine wrote the token)."""
    fork = trees.forks.get(root)
    tokens: list[int] = []
    logprobs: list | None = [] if fork is not None and fork.keep_logprobs else None
    offset = 0  # where the current level's text starts in the live text
    while fork is not None:
        result = fork.results.get(0)
        if result is not None:
            skip = max(0, sent - offset)
            new = result.tokens[skip:]
            tokens += new
            if logprobs is not None:
                logprobs += result.logprobs[skip:] if result.logprobs is not None else [None] * len(new)
            break
        branch = fork.running.get(0)
        if branch is None:
            break
        track = trees.tracks[branch]
        n = len(track) - fork.prefix_len
        skip = min(n, max(0, sent - offset))
        tokens += track.tokens[fork.prefix_len + skip :].tolist()
        if logprobs is not None:
            logprobs += track.tail_logprobs(n, skip) or [None] * (n - skip)
        offset += n
        fork = trees.forks.get(branch)
    return tokens, logprobs


def new_live_text(trees: Trees) -> list[tuple[str, list[int], list | None]]:
    """Each client request's live text not sent yet, as (request, tokens,
    logprobs); counted as sent."""
    out = []
    for parent in list(trees.forks):
        if trees.tracks[parent].is_branch:
            continue  # a branch's text is its client's live text
        sent = trees.live_sent.get(parent, 0)
        tokens, logprobs = live_text(trees, parent, sent)
        if tokens:
            trees.live_sent[parent] = sent + len(tokens)
            out.append((parent, tokens, logprobs))
    return out
