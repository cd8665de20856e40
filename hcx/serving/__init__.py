"""``hcx serve``: an OpenAI-compatible HTTP server on the megatron engine.

- :mod:`hcx.serving.protocol`: the request schemas and OpenAI-style errors;
- :mod:`hcx.serving.batches`: the model calls (generation, per-token log-probabilities),
  run identically on every tensor-parallel rank;
- :mod:`hcx.serving.worker`: the engine thread that owns the model and batches requests;
- :mod:`hcx.serving.tokens`: token strings, offsets and the ``logprobs`` objects;
- :mod:`hcx.serving.app`: the routes;
- :mod:`hcx.serving.server`: opening the model, uvicorn, shutdown, the other TP ranks.

See docs/serve.md.
"""
