"""The comparison servers of benchmarks/serving.py: a no-op BentoML service (the framework's own
ceiling here), the naive Flask server (one request, one forward pass) everyone starts from, and
uvicorn answering a constant (the HTTP floor under the service)."""

from __future__ import annotations

import os

import bentoml


@bentoml.service(name="noop", workers=1, traffic={"timeout": 30, "max_concurrency": 256})
class NoopService:
    """Same route, same JSON shape, no model: what BentoML costs per request on this machine."""

    @bentoml.api(route="/predict", batchable=True, max_batch_size=512, max_latency_ms=2000)
    def predict(self, rows: list[dict]) -> list[dict]:
        return [{"label": "x", "probabilities": {}} for _ in rows]


def flask_app():
    """`flask --app serving_servers:flask_app run --with-threads`: the tutorial server."""
    import numpy as np
    import pandas as pd
    from flask import Flask, jsonify, request

    from maas.bundle import ModelBundle

    bundle = ModelBundle.load(os.environ["MAAS_BUNDLE_DIR"])
    app = Flask("naive")

    @app.post("/predict")
    def predict():
        frame = pd.DataFrame(request.get_json()["rows"])
        probabilities = bundle.predict_proba(frame)
        return jsonify([{"label": bundle.labels[int(np.argmax(p))],
                         "probabilities": dict(zip(bundle.labels, map(float, p)))} for p in probabilities])

    @app.get("/readyz")
    def ready():
        return "ok"

    return app


CONSTANT = b'[{"label":"x","probabilities":{"x":1.0}}]'
# with a content-length, as the service answers: without one uvicorn sends the body chunked, which
# the load client does not read, so every other request failed and reconnected
CONSTANT_START = {"type": "http.response.start", "status": 200,
                  "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(CONSTANT)).encode())]}


async def constant_app(scope, receive, send):
    """uvicorn alone, answering every /predict with a constant (`python -m uvicorn
    serving_servers:constant_app`): the HTTP floor any service on this stack pays per request."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send(CONSTANT_START)
    await send({"type": "http.response.body", "body": CONSTANT})
