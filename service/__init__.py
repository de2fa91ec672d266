"""The FastAPI service, inference engines, model registry, clip buffer, adaptation worker and CLI."""
