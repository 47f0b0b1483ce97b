"""FastAPI app: OpenAI-compatible routes, admin routes, errors, authentication."""
