"""The reference decoder: the engine's control tokens, stopping, sampling."""

import pytest
import torch
from test_identity import model  # noqa: F401  (the random Qwen2 fixture)
from toy_vocab import TOKENS, VOCAB, ids

from vllm_multiverse.reference import ReferenceDecoder

EOS = VOCAB["z"]


class ScriptedLM(torch.nn.Module):
    """Puts all probability on the script's next token: a stand-in for a model
    that writes a given answer, so the test sees exactly what the decoder
    writes itself."""

    def __init__(self, prompt_len, script):
        super().__init__()
        self.prompt_len, self.script = prompt_len, script
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, input_ids, position_ids, attention_mask, past_key_values=None, use_cache=False):
        if past_key_values is None:  # a full recompute
            self.seen = []
        self.seen.extend(input_ids[0].tolist())
        nxt = self.script[len(self.seen) - self.prompt_len]
        logits = torch.full((1, input_ids.shape[1], len(VOCAB)), -10.0)
        logits[0, -1, nxt] = 10.0
        return type("Out", (), {"logits": logits})()


SCRIPT = ids(
    "a <Parallel> NL <Goal> NL <Outline> NL 1 : b </Outline> NL <Outline> NL 2 : c </Outline> NL "
    "</Goal> NL <Path> NL 1 : b b </Path> NL <Path> NL 2 : c </Path> NL <Conclusion> NL d "
    "</Conclusion> NL </Parallel> NL y z"
)
# Where the engine writes: the first header (with the shared "\n"), the
# second header (without it), the Conclusion header.
G = SCRIPT.index(VOCAB["</Goal>"])
P2 = G + 1 + 5 + 2 + 2  # header, "b b", </Path> and its tail "\n"
C = P2 + 4 + 1 + 2  # header, "c", </Path> and its tail
WRITTEN = set(range(G + 1, G + 6)) | set(range(P2, P2 + 4)) | set(range(C, C + 2))


@pytest.mark.parametrize("recompute", [False, True])
def test_writes_control_tokens_where_the_structure_says(recompute):
    prompt = ids("x y")
    lm = ScriptedLM(len(prompt), SCRIPT)
    dec = ReferenceDecoder(lm, TOKENS, eos_token_ids=[EOS])
    out = dec.generate(prompt, max_tokens=200, recompute=recompute)
    assert out.token_ids == SCRIPT
    assert {i for i, w in enumerate(out.written) if w} == WRITTEN
    assert out.finish_reason == "stop" and out.token_ids[-1] == EOS
    assert all((lp is None) == w for lp, w in zip(out.logprobs, out.written))


def test_max_tokens_counts_every_token_and_stop_ids():
    prompt = ids("x y")
    out = ReferenceDecoder(ScriptedLM(2, SCRIPT), TOKENS, eos_token_ids=[EOS]).generate(prompt, max_tokens=G + 3)
    assert out.token_ids == SCRIPT[: G + 3] and out.finish_reason == "length"
    out = ReferenceDecoder(ScriptedLM(2, SCRIPT), TOKENS, eos_token_ids=[EOS]).generate(
        prompt, max_tokens=200, stop_token_ids=[VOCAB["d"]]
    )
    assert out.token_ids == SCRIPT[: SCRIPT.index(VOCAB["d"]) + 1] and out.finish_reason == "stop"
    # A written token never stops a request, even when it is a stop id.
    out = ReferenceDecoder(ScriptedLM(2, SCRIPT), TOKENS, eos_token_ids=[EOS]).generate(
        prompt, max_tokens=200, stop_token_ids=[VOCAB["<Path>"]]
    )
    assert out.token_ids == SCRIPT


def test_prompt_ending_at_goal_starts_with_the_header():
    prompt = SCRIPT[: G + 1]
    out = ReferenceDecoder(ScriptedLM(len(prompt), SCRIPT[G + 1 :]), TOKENS, eos_token_ids=[EOS]).generate(
        prompt, max_tokens=200
    )
    assert out.token_ids == SCRIPT[G + 1 :] and out.written[:5] == [True] * 5


@torch.no_grad()
def test_cached_equals_recompute_on_a_real_model(model):  # noqa: F811
    prompt = SCRIPT[: C + 3]  # holds a complete structured prefix
    dec = ReferenceDecoder(model, TOKENS, eos_token_ids=[EOS])
    for kw in ({}, {"temperature": 0.8, "seed": 7}):
        a = dec.generate(prompt, max_tokens=24, **kw)
        b = dec.generate(prompt, max_tokens=24, recompute=True, **kw)
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


@torch.no_grad()
def test_seeded_sampling_is_reproducible(model):  # noqa: F811
    dec = ReferenceDecoder(model, TOKENS)
    prompt = ids("x y a")
    runs = [dec.generate(prompt, max_tokens=30, temperature=1.0, seed=s).token_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    top = dec.generate(prompt, max_tokens=30, temperature=1.0, top_k=1, seed=3).token_ids
    assert top == dec.generate(prompt, max_tokens=30).token_ids
