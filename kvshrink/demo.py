"""``kvshrink demo`` (``make demo``): a short evaluation on the embedded model.

Needle-in-a-haystack at ~2k tokens, key-value retrieval and open chat prompts, answered with
``full`` and six methods at about a 4x smaller cache. Prints, per method: KV bytes, compression
factor, needles found, mean prefill and decode time, negative ratio and output-length change; then
the path of the HTML report.
"""

from __future__ import annotations

import json
from collections import defaultdict

from kvshrink.eval.report import summary_table
from kvshrink.eval.runner import EvalConfig, run_eval

DEMO_METHODS = [
    "kivi:bits=2",
    "kivi:bits=4",
    "streamingllm:ratio=0.75",
    "h2o:ratio=0.75",
    "snapkv:ratio=0.75",
    "kvcrush:ratio=0.75",
]


def demo_table(records: list[dict]) -> str:
    latest = {(r["method"], r["task"], r["id"]): r for r in records}  # a resumed run may repeat a key
    by: dict[str, list[dict]] = defaultdict(list)
    for r in latest.values():
        by[r["method"]].append(r)
    head = f"{'method':<26}{'KV MiB':>8}{'factor':>8}{'needle':>8}{'prefill s':>11}{'decode s':>10}"
    lines = [head, "-" * len(head)]
    for m, rs in by.items():
        kv = sum(r["kv_bytes"] for r in rs) / len(rs)
        full = sum(r["kv_bytes_full"] for r in rs) / len(rs)
        needles = [r for r in rs if r["task"] == "needle"]
        found = f"{sum(r['score'] >= 1 for r in needles)}/{len(needles)}" if needles else "-"
        pre = sum(r["prefill_s"] for r in rs) / len(rs)
        dec = sum(r["decode_s"] for r in rs) / len(rs)
        lines.append(f"{m:<26}{kv / 2**20:>8.2f}{full / max(kv, 1):>8.2f}{found:>8}{pre:>11.2f}{dec:>10.2f}")
    return "\n".join(lines)


def run_demo(args) -> int:
    quick = getattr(args, "quick", False)
    cfg = EvalConfig(
        methods=DEMO_METHODS[:3] if quick else DEMO_METHODS,
        tasks=["needle", "kv-retrieval", "chat"],
        out=args.out,
        model=args.model,
        limit=2 if quick else 3,
        lengths=(2048,),
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    run_dir = run_eval(cfg)
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines() if line.strip()]
    print("\nPer method (means over samples; factor = uncompressed bytes / held bytes):")
    print(demo_table(records))
    print("\nAccuracy, negative samples and length drift against 'full':")
    print(summary_table(json.loads((run_dir / "summary.json").read_text())))
    print(f"\nReport: {run_dir / 'report.html'}")
    return 0
