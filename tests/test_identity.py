"""The identity that justifies the engine, on a small random Qwen2 model:
a masked forward of prefix + Path1..PathN equals, for each Path, a plain causal
forward of prefix + that Path alone at the Path's positions; the Conclusion
equals a forward over the union of the Paths' separately computed KV."""

import copy

import pytest
import torch
from toy_vocab import TOKENS, VOCAB, ids
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from vllm_multiverse.reference import ReferenceDecoder, additive_mask
from vllm_multiverse.structure import StructureConfig, analyze

PREFIX = ids(
    "x y <Parallel> NL <Goal> NL <Outline> 1 : a </Outline> <Outline> 2 : b </Outline> "
    "<Outline> 3 : c </Outline> </Goal>"
)
LEAD = ids("NL")
PATHS = [
    ids("<Path> NL 1 : a b c d a </Path> NL"),
    ids("<Path> NL 2 : c </Path> NL"),
    ids("<Path> NL 3 : d d a b </Path> NL"),
]
CONCLUSION = ids("<Conclusion> NL a b c </Conclusion> NL </Parallel> y z")
SEQ = PREFIX + LEAD + sum(PATHS, []) + CONCLUSION


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(cfg).to(torch.float32).eval()


def causal_logits(model, token_ids, positions, cache=None):
    # An explicit causal mask: without one, transformers reads a position id
    # that does not grow by one as the start of a packed sequence.
    past = cache.get_seq_length() if cache is not None else 0
    q = len(token_ids)
    allowed = torch.ones(q, past + q, dtype=torch.bool).tril(past)
    out = model(
        input_ids=torch.tensor([token_ids]),
        position_ids=torch.tensor([positions]),
        attention_mask=additive_mask(allowed, torch.float32),
        past_key_values=cache,
        use_cache=cache is not None,
    )
    return out.logits[0]


@pytest.mark.parametrize("convention", ["training", "engine"])
@torch.no_grad()
def test_paths_equal_standalone_branches(model, convention):
    config = StructureConfig(positions=convention)
    dec = ReferenceDecoder(model, TOKENS, config)
    masked = dec.forward_logits(SEQ)
    pos = analyze(SEQ, TOKENS, config).positions.tolist()
    head = len(PREFIX) + len(LEAD)
    start = head
    for path in PATHS:
        idx = list(range(head)) + list(range(start, start + len(path)))
        alone = causal_logits(model, [SEQ[i] for i in idx], [pos[i] for i in idx])
        torch.testing.assert_close(alone[head:], masked[start : start + len(path)], rtol=0, atol=2e-5)
        start += len(path)
    # The control: a plain causal forward of the whole sequence differs on
    # the later Paths, so the comparison above can fail.
    plain = causal_logits(model, SEQ, pos)
    assert (plain[head + len(PATHS[0]) :] - masked[head + len(PATHS[0]) :]).abs().max() > 1e-3


@pytest.mark.parametrize("convention", ["training", "engine"])
@torch.no_grad()
def test_conclusion_reads_union_of_path_kv(model, convention):
    config = StructureConfig(positions=convention)
    masked = ReferenceDecoder(model, TOKENS, config).forward_logits(SEQ)
    pos = analyze(SEQ, TOKENS, config).positions.tolist()
    head = len(PREFIX) + len(LEAD)
    prefix_cache = DynamicCache()
    causal_logits(model, SEQ[:head], pos[:head], prefix_cache)
    # Each Path decoded as its own branch on a copy of the prefix KV.
    keys = [[layer.keys] for layer in prefix_cache.layers]
    values = [[layer.values] for layer in prefix_cache.layers]
    start = head
    for path in PATHS:
        branch = copy.deepcopy(prefix_cache)
        causal_logits(model, path, pos[start : start + len(path)], branch)
        for li, layer in enumerate(branch.layers):
            keys[li].append(layer.keys[:, :, head:])
            values[li].append(layer.values[:, :, head:])
        start += len(path)
    merged = DynamicCache()
    for li in range(len(keys)):
        merged.update(torch.cat(keys[li], dim=2), torch.cat(values[li], dim=2), li)
    assert merged.get_seq_length() == start
    concl = causal_logits(model, SEQ[start:], pos[start:], merged)
    torch.testing.assert_close(concl, masked[start:], rtol=0, atol=2e-5)


@torch.no_grad()
def test_nested_branch_is_prefix_plus_its_path(model):
    """Nesting: an outer Path holding a block decodes like prefix + that Path
    alone, under the same rule (its own inner mask applies inside it)."""
    inner = ids(
        "<Parallel> <Goal> <Outline> 1 . 1 : </Outline> <Outline> 1 . 2 : </Outline> </Goal> NL "
        "<Path> NL 1 . 1 : a </Path> NL <Path> NL 1 . 2 : b c </Path> NL <Conclusion> NL d "
        "</Conclusion> NL </Parallel> NL"
    )
    path1 = ids("<Path> NL 1 : a") + inner + ids("b </Path> NL")
    seq = PREFIX + LEAD + path1 + PATHS[1] + PATHS[2] + CONCLUSION
    dec = ReferenceDecoder(model, TOKENS)
    masked = dec.forward_logits(seq)
    head = len(PREFIX) + len(LEAD)
    alone = dec.forward_logits(seq[: head + len(path1)])
    torch.testing.assert_close(alone, masked[: head + len(path1)], rtol=0, atol=2e-5)
    p2 = head + len(path1)
    branch2 = dec.forward_logits(seq[:head] + PATHS[1])
    torch.testing.assert_close(branch2[head:], masked[p2 : p2 + len(PATHS[1])], rtol=0, atol=2e-5)
