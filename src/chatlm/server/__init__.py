"""Serving: an OpenAI-compatible HTTP API and a web chat page over the inference engine.

- `batching`: the scheduler that owns the `Engine` on one thread (continuous batching, admission
  control, cancellation);
- `app`: the routes (FastAPI): /v1/chat/completions, /v1/completions, /v1/models, /health,
  /metrics and the page at /;
- `schemas`: the request and response shapes (pydantic); `prompts`: bodies -> prompt token ids;
- `metrics`: Prometheus text format; `serving`: the stage body of `python -m chatlm.serve`;
- `static/`: the web chat page (plain HTML, CSS and JavaScript, no build step).

Needs the `serve` extra (fastapi, uvicorn, pydantic); docs/serving.md describes the API.
"""
