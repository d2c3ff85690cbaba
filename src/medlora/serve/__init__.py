"""``medlora serve``: an OpenAI-compatible chat-completions API and a chat page, one model on one CPU.

Modules: ``server`` (options, binding rules, model loading, uvicorn), ``app`` (the FastAPI routes), ``middleware``
(API key, request log), ``schemas`` (the request body, OpenAI-shaped errors, sampling presets), ``worker`` (one
generation at a time from a bounded queue), ``page.html`` (the chat page, one self-contained file)."""
