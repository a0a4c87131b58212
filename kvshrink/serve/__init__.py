"""OpenAI-compatible HTTP server over the kvshrink engine (``kvshrink serve``)."""
