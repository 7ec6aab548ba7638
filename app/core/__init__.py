"""The domain both processes share (tables, job spec, settings, storage, errors, datasets); imports only app.core, never fastapi/starlette or torch at module level."""
