"""`lorafit serve`: one base model and many adapters behind OpenAI's API, requests for different adapters batched
together (``engine``: continuous batching over ``lorafit.per_row``; ``app``: the FastAPI endpoints)."""
