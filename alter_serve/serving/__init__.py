"""The service layer: the running server's state and operations, without HTTP.

It sits between the web layer and the parts it drives (cli → api → serving → registry / engine →
core): it imports no FastAPI and nothing from `api`, raises its own errors (`serving.errors`), and
`api` alone turns those into OpenAI error bodies. `routing` is the one place where a request's model
name becomes a lease on a vLLM LoRARequest.
"""
