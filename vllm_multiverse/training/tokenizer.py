"""The tiny model's tokenizer: one token per character, the tags as specials.

Character tokens keep the structure rule's token view and the text view in
step (a label "1.2:" is exactly four tokens wherever it appears), and the
vocabulary small enough for a model that trains on two CPU cores.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vllm_multiverse.structure import TAG_NAMES
from vllm_multiverse.training.tasks import ANSWER_CUE, PARALLEL_CUE

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIALS = (EOS, IM_START, IM_END, *TAG_NAMES)
# Fixed phrases the model writes often are one token each: cheaper sequential
# steps, same text.
PHRASES = (PARALLEL_CUE, ANSWER_CUE)
CHARS = "\n" + string.digits + string.ascii_letters + " .,:;!?'\"()[]{}+-*/=<>_#%&|^~@$`\\"

# The ChatML template Qwen2.5 uses, with its default system prompt dropped:
# the tiny model was trained without one.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS) + PHRASES)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    tok.add_tokens(list(PHRASES))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=EOS,
        additional_special_tokens=[IM_START, *TAG_NAMES],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    fast = build_tokenizer()
    fast.save_pretrained(str(path))
    return fast
