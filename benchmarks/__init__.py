"""Benchmarks of the server against vLLM's own OpenAI server."""
