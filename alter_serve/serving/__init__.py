"""The service layer: the running server's state and operations, without HTTP.

It sits between the web layer and the parts it drives (cli → api → serving → registry / engine →
core): it imports no FastAPI and nothing from `api`, raises its own errors (`errors`), and `api`
alone turns those into OpenAI error bodies.

    service.py         AlterService: the parts below wired together; lifecycle; begin a request
    routing.py         the one place where a model name becomes a lease on a vLLM LoRARequest
    runs.py            one model request from admission to its end (lease, permit, metrics, log)
    limits.py          admission: per-tenant limits, the server-wide sequence cap, feedback rate
    planning.py        a request body → tokenised prompts and SamplingParams, checked
    generation.py      a plan run on the engine, shaped as OpenAI responses and stream chunks
    tokens.py          token ids as exact bytes and text
    catalog.py         the model cards a caller may see (/v1/models)
    publishing.py      the engine's views kept in line with the registry (hot-swap, sync, failures)
    admin.py           the admin operations: change the registry, then publish to the engine
    request_log.py     the request log, written in batches
    errors.py          the service's errors
    schemas.py         the OpenAI request bodies (pydantic); request_fields.py: what each field does
"""
