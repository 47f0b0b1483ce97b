"""The web layer: the FastAPI app over the service (`serving`). It parses requests, checks keys
before bodies are read, calls the service through the typed `dependencies.ServiceDep`, and answers
in the OpenAI format, mapping the service's errors to OpenAI error bodies (`errors`).

    app.py             the app: middleware (key gate, body limits), health, readiness, metrics
    openai_routes.py   /v1/models, /v1/completions, /v1/chat/completions, /v1/feedback
    admin_routes.py    /admin/...: one service method per handler
    dashboard.py       /dashboard (a static page over the admin API)
    auth.py            bearer keys → principals; admin checks
    streaming.py       server-sent events, and a response that always finishes its request
    uploads.py         multipart uploads streamed to disk
    errors.py          the OpenAI error body, and the mapping of the service's errors to it
    dependencies.py    what routes depend on: the service
"""
