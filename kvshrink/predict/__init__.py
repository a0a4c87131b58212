"""Predict before you pay: what a KV-cache method would do, from cheap inputs.

- ``hardware``: hardware descriptions (presets with published figures, or your own).
- ``modelconfig``: the shape of a model from its HF ``config.json`` (no weights).
- ``storage``: what a method stores per token and layer (read-only use of ``kvshrink.methods``).
- ``costmodel``: per-operator step-cost models fitted to a profile's raw points, with fit quality.
- ``roofline``: per-operator step cost from bytes moved and FLOPs on described hardware.
- ``profile``, ``simulate``, ``throughput``: ``kvshrink profile`` and the engine-scheduler simulation.
- ``lengths``: a method's output length for a prompt, from eval records (length drift).
- ``advise``: measured and predicted figures per method, ranked, with a Pareto plot and a recommendation.
"""
