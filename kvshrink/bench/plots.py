"""Throughput plots (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path


def plot_throughput(runs: list[dict], out: Path, mode: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in runs))
    fig, ax = plt.subplots(figsize=(7, 4))
    if mode in ("fixed-batch", "fixed-length"):
        x = "batch" if mode == "fixed-batch" else "context"
        for m in methods:
            rows = sorted((r for r in runs if r["method"] == m and x in r), key=lambda r: r[x])
            ax.plot([r[x] for r in rows], [r["decode_tokens_per_s"] or 0 for r in rows], marker="o", label=m)
        ax.set_xlabel("batch size" if x == "batch" else "context length (tokens)")
        ax.set_xscale("log", base=2)
        ax.set_ylabel("decode tokens/s")
    else:
        key = "step_ms" if mode == "step" else "tokens_per_s"
        wls = list(dict.fromkeys(r.get("workload", "") for r in runs))
        w = 0.8 / max(len(methods), 1)
        for i, m in enumerate(methods):
            vals = [next((r.get(key) or 0 for r in runs if r["method"] == m and r.get("workload") == wl), 0)
                    for wl in wls]
            ax.bar([j + i * w for j in range(len(wls))], vals, width=w, label=m)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(wls))], wls)
        ax.set_ylabel("decode step (ms)" if mode == "step" else "output tokens/s")
    ax.legend(fontsize=7)
    ax.set_title(f"kvshrink engine throughput ({mode})")
    fig.tight_layout()
    fig.savefig(Path(out) / f"throughput_{mode}.png", dpi=120)
    plt.close(fig)
