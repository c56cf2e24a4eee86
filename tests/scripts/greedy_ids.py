"""Greedy token ids of fixed prompts through vllm.LLM, as JSON on stdout.

Run by tests in a fresh process so that the environment (VLLM_PLUGINS)
decides which plugins load.
"""

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    model, n = sys.argv[1], int(sys.argv[2])
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512,
              kv_cache_memory_bytes=128 * 2**20, seed=0)
    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 90 + 15 for j in range(5 + i % 7)]} for i in range(n)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False)
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
