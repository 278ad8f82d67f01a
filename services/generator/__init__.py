"""Generator: streams tokens from a local model, TGI, or an OpenAI-compatible server."""
