"""Serving over HTTP on Ray Serve (``pip install 'cair-runtime[serve]'``).

- ``config``: the service and scaling settings (no Ray needed);
- ``api``: the OpenAI-shaped request checks, responses and errors (no Ray needed);
- ``app``: the Ray Serve deployment and ``build_app`` for ``serve run`` / ``serve deploy``;
- ``cli``: ``cair-serve ENGINE_DIR``.

Only ``app`` and ``cli`` import Ray and FastAPI; the rest of ``cair_runtime`` never does.
"""
