"""The main job (`make demo`): `vllm serve` on the bundled tiny Multiverse
model with the plugin, a few real prompts through the OpenAI client, each
answer's parallel structure drawn as a tree, and the measured time against
sequential decoding of the same request (same tokens, no branches)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tiny_model.tasks import make_task
from vllm_multiverse.structure import EventKind, StructureConfig, analyze

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "multiverse-tiny"

# One prompt of each kind, from the test set (never trained on), written
# down before the model they show was trained: a plain answer, one block
# of eight Paths, two rounds, a split Path with its nested block.
DEMO_TASKS = (
    make_task("plain", 29, 4),
    make_task("block 8", 37),
    make_task("rounds 4+4", 10),
    make_task("split 5", 96),
)


def draw_tree(token_ids, prompt_len: int, tokens, tok) -> str:
    """One line per block and Path of the output, each nested block under
    the Path that holds it."""
    s = analyze(token_ids, tokens)
    forks = [e for e in s.events if e.kind is EventKind.FORK and e.index >= prompt_len]
    lines: list[str] = []

    def blocks_in(start: int, end: int, depth: int, pad: str) -> None:
        for ev in forks:
            if ev.depth != depth or not start <= ev.index < end:
                continue
            paths = [sp for sp in s.spans if sp.block == ev.block]
            lines.append(f"{pad}Parallel block ({len(paths)} Paths)")
            for k, sp in enumerate(paths):
                last = k == len(paths) - 1
                text = tok.decode(token_ids[sp.start : sp.end], skip_special_tokens=True).strip()
                first = text.splitlines()[0] if text else ""
                lines.append(f"{pad}{'`-' if last else '+-'} Path {first!r}: {sp.end - sp.start} tokens")
                blocks_in(sp.start, sp.end, depth + 1, pad + ("   " if last else "|  "))

    blocks_in(prompt_len, len(token_ids), 1, "")
    return "\n".join(lines) if lines else "(no Parallel block: a plain answer)"


def parallelism(token_ids, tokens) -> float:
    """Output tokens over critical-path tokens (a Parallel block's Paths
    decode side by side): with the engine's positions every Path of a block
    starts at one position and the Conclusion follows the longest."""
    pos = analyze(token_ids, tokens, StructureConfig(positions="engine")).positions
    return len(token_ids) / max(1, int(pos[-1] - pos[0]) + 1)


def start_server(
    log_path: Path, extra_args=(), progress: bool = True, model: Path = MODEL_DIR, kv_cache_bytes: int = 512 * 2**20
) -> tuple[subprocess.Popen, str]:
    """`vllm serve` on a model (the bundled one) with the plugin; returns once it is healthy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        str(Path(sys.executable).with_name("vllm")), "serve", str(model), "--plugin", "multiverse",
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
        "--kv-cache-memory-bytes", str(kv_cache_bytes), "--host", "127.0.0.1", "--port", str(port), *extra_args,
    ]
    if progress:
        print("$ " + " ".join(["vllm", *cmd[1:]]))
    # The server loads the plugins vLLM finds, in its own engine process.
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    spin = "|/-\\"
    i = 0
    while True:
        try:
            if urllib.request.urlopen(base + "/health", timeout=1).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() - t0 > 600:
            proc.kill()
            raise RuntimeError("the server did not start; its log:\n" + log_path.read_text()[-3000:])
        if progress:
            sys.stdout.write(f"\rLoading the model and starting vLLM {spin[i % 4]} {time.time() - t0:4.0f} s")
            sys.stdout.flush()
        i += 1
        time.sleep(0.25)
    if progress:
        print(f"\rServer ready after {time.time() - t0:.0f} s ({log_path})          ")
    return proc, base


def main() -> int:
    if not (MODEL_DIR / "model.safetensors").exists():
        print(f"The bundled model is missing: {MODEL_DIR}. Train it with `make model`.")
        return 1
    from openai import OpenAI
    from transformers import AutoTokenizer

    from tiny_model.tasks import extract_answer
    from vllm_multiverse.model_config import read_model_declaration

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    mv = read_model_declaration(json.loads((MODEL_DIR / "config.json").read_text())).tokens

    try:
        proc, base = start_server(Path(tempfile.mkdtemp(prefix="mv-demo-")) / "server.log")
    except RuntimeError as e:
        print(e)
        return 1
    try:
        client = OpenAI(base_url=base + "/v1", api_key="none", timeout=600)
        for task in DEMO_TASKS:
            messages = [{"role": "user", "content": task.prompt()}]

            def ask(sequential: bool, messages=messages):
                extra = {"skip_special_tokens": False, "vllm_xargs": {"multiverse_sequential": sequential}}
                t0 = time.perf_counter()
                r = client.chat.completions.create(model=str(MODEL_DIR), messages=messages, temperature=0,
                                                   max_tokens=1500, extra_body=extra)
                return r, time.perf_counter() - t0

            par, t_par = ask(False)
            seq, t_seq = ask(True)
            text = par.choices[0].message.content
            ids = tok.encode(text, add_special_tokens=False)
            answer = extract_answer(text)
            mark = "right" if answer == task.answer() else f"wrong, expected {task.answer()}"
            print("\n" + "=" * 72)
            print(f"Prompt: {task.prompt()}")
            print(draw_tree(ids, 0, mv, tok))
            print(f"Answer: {answer}  ({mark})")
            same = "same tokens" if seq.choices[0].message.content == text else "DIFFERENT tokens"
            print(f"{par.usage.completion_tokens} tokens, degree of parallelism {parallelism(ids, mv):.2f} "
                  f"(output tokens / critical-path tokens); parallel {t_par:.2f} s, sequential {t_seq:.2f} s: "
                  f"measured speedup {t_seq / t_par:.2f}x ({same})")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
