"""Prefill time of a prompt that holds Parallel blocks (masked) against a
plain prompt of the same length (unmasked), in one engine.

    python benchmarks/masked_prefill.py [--tokens 4096] [--rounds 5] [--model DIR]

The model is the Multiverse-32B-shaped fixture (``tests/multiverse32b.py``:
Qwen2.5's tokenizer, GQA 4/2 heads of 64; built into a temporary folder
unless ``--model`` names one), its positions stretched to fit the prompt.
The masked prompt is the authors' serialisation: sequential text and
Parallel blocks of 2-4 Paths, some nested, to exactly ``--tokens`` tokens;
the plain prompt is the same words without the tags. Each request decodes
one token; prefix caching is off, so every run prefills the whole prompt.
The two are alternated ``--rounds`` times and the medians compared; one
JSON line is printed. ``MULTIVERSE_CPU_KERNEL=0`` gives the SDPA route.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the sum of each term is then checked against the bound we found so far and the "
         "remaining cases follow from the same argument applied twice over").split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "\n"


def _block(rng: random.Random, label: str, depth: int) -> str:
    paths = rng.randint(2, 4)
    labels = [f"{label}{i + 1}" for i in range(paths)]
    out = "Let's think in parallel.\n<Parallel>\n<Goal>\n"
    out += "".join(f"<Outline>\n{lab}: {_text(rng, 8)}</Outline>\n" for lab in labels) + "</Goal>\n"
    for lab in labels:
        body = _text(rng, rng.randint(20, 60))
        if depth < 2 and rng.random() < 0.4:
            body += _block(rng, lab + ".", depth + 1)
        out += f"<Path>\n{lab}: {body}</Path>\n"
    return out + f"<Conclusion>\n{_text(rng, 20)}</Conclusion>\n</Parallel>\n"


def prompts(tok, n_tokens: int, seed: int) -> tuple[list[int], list[int]]:
    """(structured, plain) token ids, both exactly ``n_tokens`` long; the
    structured one's blocks are all closed."""
    rng = random.Random(seed)
    head = tok.apply_chat_template([{"role": "user", "content": "Work it out. Think in parallel."}],
                                   add_generation_prompt=True, tokenize=False)
    body, last = "<Think>\n", None
    while True:
        body += _text(rng, 30)
        ids = tok.encode(head + body, add_special_tokens=False)
        if len(ids) > n_tokens:
            break
        last = ids
        body += _block(rng, "", 0)
    structured = last + tok.encode(_text(rng, n_tokens), add_special_tokens=False)
    structured = structured[:n_tokens]
    tags = set(tok.convert_tokens_to_ids(["<Parallel>", "</Parallel>", "<Goal>", "</Goal>", "<Outline>",
                                          "</Outline>", "<Path>", "</Path>", "<Conclusion>", "</Conclusion>",
                                          "<Think>", "</Think>"]))
    plain = [t for t in structured if t not in tags]
    plain += tok.encode(_text(rng, n_tokens), add_special_tokens=False)[: n_tokens - len(plain)]
    return structured, plain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import multiverse32b
    from vllm import LLM, SamplingParams


    model = args.model or multiverse32b.build(Path(tempfile.mkdtemp(prefix="mv32b-")))
    max_len = args.tokens + 8
    llm = LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=max_len,
              max_num_batched_tokens=max_len, enable_prefix_caching=False, kv_cache_memory_bytes=1 << 30,
              hf_overrides={"max_position_embeddings": max_len}, seed=0)
    # Hugging Face's tokenizer of the checkpoint: the tags in the text become
    # their special ids (checked below).
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    sp = SamplingParams(temperature=0.0, max_tokens=1)
    times: dict[str, list[float]] = {"masked": [], "plain": []}
    for r in range(args.rounds + 1):  # round 0 warms the engine up
        structured, plain = prompts(tok, args.tokens, seed=r)
        for name, ids in (
            (("masked", structured), ("plain", plain)) if r % 2 else (("plain", plain), ("masked", structured))
        ):
            t0 = time.perf_counter()
            llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)
            if r:
                times[name].append(time.perf_counter() - t0)
    info = _structure(tok, structured)
    assert info["parallel_blocks"] and info["well_formed"] and info["hidden_share"] > 0, info
    masked, plain = statistics.median(times["masked"]), statistics.median(times["plain"])
    print(
        json.dumps(
            {
                "tokens": args.tokens,
                **info,
                "masked_s": round(masked, 4),
                "plain_s": round(plain, 4),
                "ratio": round(masked / plain, 3),
                "runs": times,
            }
        )
    )


def _structure(tok, ids: list[int]) -> dict:
    """What the masked prompt holds: its Parallel blocks, and the share of
    its causal (query, key) pairs that the mask hides."""
    from vllm_multiverse.model_config import derive_declaration, read_model_declaration
    from vllm_multiverse.structure import analyze

    mv = read_model_declaration({"multiverse": derive_declaration(tok)}).tokens
    s = analyze(ids, mv)
    n = len(ids)
    hidden = sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in s.hidden_rects())
    return {
        "parallel_blocks": ids.count(tok.convert_tokens_to_ids("<Parallel>")),
        "well_formed": s.well_formed,
        "hidden_share": round(hidden / (n * (n + 1) / 2), 4),
    }


if __name__ == "__main__":
    main()
