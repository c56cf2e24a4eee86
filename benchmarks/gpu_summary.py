"""The one summary table of scripts/gpu_check.sh.

Every step of the script and every figure a check measures is a record: one
JSON line appended to ``$GPU_CHECK_RECORDS`` (nothing is written where it is
unset, so the checks also run on their own). A figure belongs to the step
that was running (``$GPU_CHECK_STEP``) and is listed under it.

    python benchmarks/gpu_summary.py step NAME RC SECONDS [NOTE]   # a step's result
    python benchmarks/gpu_summary.py table                         # print it; exit 1 unless all passed

``table`` also writes the table to ``$OUT/gpu_check.md`` when ``$OUT`` is set.
A step fails on a non-zero exit status (124: timed out; 125: not run).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _append(entry: dict) -> None:
    path = os.environ.get("GPU_CHECK_RECORDS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def record(check: str, ok: bool, **figures) -> None:
    """A measured check and its figures (``name=value``, in order)."""
    text = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in figures.items())
    print(f"{'PASS' if ok else 'FAIL'} {check}: {text}")
    _append({"kind": "figure", "step": os.environ.get("GPU_CHECK_STEP", ""), "check": check, "ok": ok, "figures": text})


def step(name: str, rc: int, seconds: float, note: str = "") -> None:
    why = {0: "", 124: "timed out", 125: "not run: out of time"}.get(rc, f"exit {rc}")
    text = "; ".join(x for x in (f"{seconds:.1f} s", why, note) if x)
    _append({"kind": "step", "step": name, "check": name, "ok": rc == 0, "figures": text})


def table(records: list[dict]) -> tuple[str, bool]:
    """(markdown, all passed): each step, then the figures recorded during it."""
    steps = [r for r in records if r["kind"] == "step"]
    figures = [r for r in records if r["kind"] == "figure"]
    lines = ["| check | result | figures |", "|---|---|---|"]

    def line(r: dict, indent: str = "") -> None:
        cells = [indent + r["check"], "PASS" if r["ok"] else "**FAIL**", r["figures"]]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")

    for s in steps:
        line(s)
        for f in figures:
            if f["step"] == s["step"]:
                line(f, "↳ ")
    for f in figures:
        if f["step"] not in {s["step"] for s in steps}:
            line(f)
    ok = bool(steps) and all(r["ok"] for r in records)
    lines.append(f"\n**{'ALL PASSED' if ok else 'FAILED'}** ({sum(not r['ok'] for r in records)} failing)")
    return "\n".join(lines), ok


def main(argv: list[str]) -> int:
    if argv[:1] == ["step"] and len(argv) in (4, 5):
        step(argv[1], int(argv[2]), float(argv[3]), *argv[4:])
        return 0
    if argv == ["table"]:
        path = Path(os.environ["GPU_CHECK_RECORDS"])
        records = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        text, ok = table(records)
        print(text)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "gpu_check.md").write_text(text + "\n")
        return 0 if ok else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
