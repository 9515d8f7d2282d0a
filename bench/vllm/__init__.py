"""``make bench-vllm``: Sluice with a vLLM node against bare vLLM's own OpenAI-compatible server,
same model, dtype and arrivals (issue 20, deliverable 4)."""
