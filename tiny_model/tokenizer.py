"""The tiny model's tokenizer: one token per character, the tags as specials.

A Qwen2 byte-level BPE with no merges: every character is one token (a
label "1.2:" is exactly four tokens wherever it appears, so the structure
rule's token view and the text view stay in step), and the vocabulary is
small enough for a model that trains on two CPU cores. It is built with
transformers' own ``Qwen2Tokenizer``, so it loads the same way in
transformers (which picks that class for a ``qwen2`` model) and in vLLM.
"""

from __future__ import annotations

from transformers import AddedToken
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from tiny_model.tasks import ANSWER_CUE, PARALLEL_CUE, result_labels, result_mark
from vllm_multiverse.structure import TAG_NAMES

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIALS = (EOS, IM_START, IM_END, *TAG_NAMES)
# Fixed phrases the model writes often are one token each: cheaper
# sequential steps, same text.
PHRASES = (PARALLEL_CUE, ANSWER_CUE)
# "#3=", the mark before Path 3's result: one token, so that the
# Conclusion finds each result by a single token (tasks.py, `_conclusion`).
RESULT_MARKS = tuple(result_mark(label) for label in result_labels())

# The ChatML template Qwen2.5 uses, without its default system prompt: the
# tiny model was trained without one.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def build_tokenizer(tags: bool = True) -> Qwen2Tokenizer:
    """``tags=False``: the same tokenizer without the Multiverse tags (a
    model that is not a Multiverse model, for tests)."""
    specials = SPECIALS if tags else SPECIALS[:3]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in _byte_chars():
        vocab[ch] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token=IM_END, pad_token=EOS, unk_token=None)
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in specials[1:]]}
    )
    tok.add_tokens([AddedToken(p, normalized=False) for p in PHRASES + RESULT_MARKS])
    tok.chat_template = CHAT_TEMPLATE
    return tok

