"""`loratune serve`: one frozen base model and many LoRA adapters behind an OpenAI-compatible API.

Modules: `lora_rows` (per-row LoRA layers: one base matmul, gathered adapter matmuls), `batch_cache`
(the left-padded KV cache of the running batch), `engine` (the thread that owns the model and runs
continuous batching), `registry` (adapter names, roots and validation), `api` (FastAPI routes,
errors, metrics), `guard` (auth and body limits, before any route) and `static/` (the playground
page served at `/`).
"""
