"""Decode-step micro-benchmark: one engine decode step at equal batch and context, per method.

    python benchmarks/decode_step.py --batch 16 --context 1024 --steps 16

Equivalent to ``kvshrink bench throughput --mode step``; prints step time and the ratio to ``full``
measured in the same process (run methods side by side: the machine is shared and noisy).
"""

from __future__ import annotations

import argparse

from kvshrink.bench.throughput import decode_step_ms
from kvshrink.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--method", action="append", default=None)
    a = ap.parse_args()
    model, _ = load_model(a.model)
    methods = ["full", *(a.method or ["kivi:bits=4", "kivi:bits=2"])]
    vocab = min(model.config.vocab_size, 32000)
    base = None
    for m in methods:
        r = decode_step_ms(model, m, a.batch, a.context, a.steps, vocab)
        base = base or r["step_ms"]
        print(f"{m:24s} {r['step_ms']:8.1f} ms  x{r['step_ms'] / base:.2f}  {r['time_breakdown_ms']}")


if __name__ == "__main__":
    main()
