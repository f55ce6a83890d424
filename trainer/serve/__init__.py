"""`kubetune serve`: an OpenAI-compatible HTTP server with continuous batching and LoRA adapters.

Layers, each usable on its own:
- `runner.BatchedRunner`: the model side. Per-sequence KV cache rows, one batched decode step over
  all running sequences, several LoRA adapters at once (a per-row adapter index).
- `engine.Engine`: the scheduler. A bounded waiting queue, a running set up to max_concurrency,
  one decode step at a time on a worker thread; sequences leave when finished or cancelled and
  waiting ones join between steps.
- `app.create_app`: the FastAPI app (OpenAI request/response shapes, SSE streaming, errors,
  health, readiness, Prometheus metrics).
- `cli.serve_command`: loads the model, tokenizer and adapters and runs uvicorn.
"""
