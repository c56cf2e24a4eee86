"""The ``vllm-multiverse`` command.

``vllm-multiverse declare MODEL_DIR`` prints the declaration the engine
reads a checkpoint with (its config.json entry, else the one its tokenizer
implies, exactly as ``vllm serve`` derives it); ``--write`` stores it in the
checkpoint's config.json, ``--positions`` sets the position convention.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vllm_multiverse.model_config import model_declaration, write_multiverse_config


def declare(args: argparse.Namespace) -> int:
    entry = model_declaration(args.model_dir)
    if entry is None:
        print(f"{args.model_dir} is not a Multiverse model: no declaration, no Multiverse tags in its tokenizer",
              file=sys.stderr)
        return 1
    if args.positions:
        entry = {**entry, "positions": args.positions}
    print(json.dumps(entry, indent=2, sort_keys=True))
    if args.write:
        write_multiverse_config(args.model_dir, entry)
        print(f"written to {Path(args.model_dir) / 'config.json'}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-multiverse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("declare", help="print (and with --write store) a checkpoint's Multiverse declaration")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--positions", choices=["training", "engine"], help="the position convention to declare")
    p.add_argument("--write", action="store_true", help="store the declaration in the checkpoint's config.json")
    p.set_defaults(run=declare)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
