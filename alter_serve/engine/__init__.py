"""The model runtime behind the API: vLLM AsyncLLM in-process, LoRA views as LoRARequests."""
