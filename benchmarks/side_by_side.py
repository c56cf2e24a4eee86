"""Benchmark configurations as engines side by side: each in its own
process, started once and idle between runs, so that runs of different
configurations can alternate within a minute of each other.

The child prints ``READY`` once its engine is warm, then answers each line
of its stdin with one ``RESULT {json}`` line on stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile


class Child:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, *cmd], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)

    def wait_for(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag) :]
        self.log.seek(0)
        raise SystemExit(f"{self.name} failed:\n{self.log.read()[-4000:]}")

    def run(self, request: str) -> dict:
        self.proc.stdin.write(f"{request}\n")
        self.proc.stdin.flush()
        return json.loads(self.wait_for("RESULT "))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
