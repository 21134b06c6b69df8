"""gemma3-serve: an OpenAI-compatible HTTP server over an exported Gemma 3 folder (no torch).

Built on FastAPI + uvicorn: a well-kept, widely deployed ASGI stack whose streaming responses, disconnect
detection and graceful shutdown (SIGTERM: stop accepting, finish or time out in-flight requests, then the
lifespan's shutdown closes the engine) are what an OpenAI-style server needs, and whose request models give
typed, named validation errors. Generation runs on a `runtime.jobs.Engine` thread; the event loop only
detokenizes, matches stop strings and writes responses.

    gemma3-serve --model out/gemma-3-270m-it --port 8000
"""
