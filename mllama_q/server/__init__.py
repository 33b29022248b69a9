"""`mllama-q serve`: the model behind the OpenAI and Ollama HTTP APIs, so apps that speak either
(Open WebUI, editors, scripts using the `openai` or `ollama` client libraries) use it by
changing only their base URL.

Stack: Starlette on uvicorn. Both are small, widely deployed and actively maintained (the
ASGI pair llama-cpp-python's and vLLM's OpenAI servers run on, through FastAPI); Starlette
gives routing, streaming responses and ASGI middleware without FastAPI's pydantic request
models, which would duplicate the hand-written validation here (each reference API has its own
error format and its own leniency rules, see fields.py); uvicorn is the reference ASGI server
and needs no compiled extras (a plain `pip install` gets h11 and the standard asyncio loop).

Modules:
    app.py         create_app(): routes, API-key check, one log line per request, /health
    openai_api.py  /v1/chat/completions, /v1/completions, /v1/models
    ollama_api.py  /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version, HEAD /
    engine.py      the model, its slots (sessions), the FIFO queue, generation threads
    transport.py   bounded body reading, client-disconnect handling, streaming responses
    fields.py      typed reading of untrusted JSON bodies (400s that name the field)
    images.py      inline images (data URLs, base64) decoded under explicit limits
    info.py        model names and descriptions (listings, /api/show)
    errors.py      APIError and the two error body formats

Only `mllama_q.cli.serve` imports this package: `import mllama_q` and the other commands never
load Starlette or uvicorn.
"""

from .app import ServerConfig, create_app
from .engine import Engine, load_model
from .images import ImageLimits
from .info import ModelInfo

__all__ = ["create_app", "Engine", "ImageLimits", "ModelInfo", "ServerConfig", "load_model"]
