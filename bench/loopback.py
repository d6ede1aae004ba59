"""What the loopback service benchmarks (abuse.py, gateway.py, soak.py) share: a tiny tokenizer
corpus, a free port, and the percentile they report."""

from __future__ import annotations

import socket

CORPUS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n",
          "class Stack:\n    def push(self, x):\n        self.items.append(x)\n"] * 40


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
