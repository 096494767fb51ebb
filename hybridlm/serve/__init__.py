"""The OpenAI-compatible server: `create_app(llm)` for an ASGI app, `run(model_dir, host, port)` to serve.

Needs the `serve` extra (fastapi, uvicorn): `pip install "hybridlm[serve]"`.
"""
from hybridlm.serve.app import create_app, run

__all__ = ["create_app", "run"]
