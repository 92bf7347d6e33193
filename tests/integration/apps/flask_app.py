"""The Flask app of the web tests: ``allocpolicy run -- gunicorn flask_app:app``."""

from __future__ import annotations

from flask import Flask, jsonify, request

import work
from allocpolicy.integrations.flask import AllocPolicy

app = Flask(__name__)
AllocPolicy(app)


@app.get("/hello")
def hello():
    return jsonify(work.hello(request.args))


@app.get("/repeat")
def repeat():
    return jsonify(work.repeat(request.args))


@app.get("/array")
def array():
    return jsonify(work.array(request.args))


@app.post("/image")
def image():
    return jsonify(work.image(request.get_data()))


@app.post("/echo")
def echo():
    return jsonify(work.echo(request.get_data()))


@app.get("/grow")
def grow():
    return jsonify(work.grow(request.args))


@app.get("/stream")
def stream():
    return app.response_class(work.stream(request.args), mimetype="text/plain")


@app.get("/stats")
def stats():
    return jsonify(work.stats(request.args))
