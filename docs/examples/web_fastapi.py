"""A FastAPI service protected with one line, served and queried in one script.

In production, run the app with uvicorn under the runtime::

    allocpolicy run --policy web_policy.toml -- uvicorn web_fastapi:app --loop uvloop

Here the script serves it with uvicorn on a loopback port and sends requests
from a thread, to show what a client sees:

    allocpolicy run --policy docs/examples/web_policy.toml -- python docs/examples/web_fastapi.py
"""

import asyncio
import http.client
import json
import logging
import threading
import time

import uvicorn
from fastapi import FastAPI

from allocpolicy.integrations.asgi import AllocPolicyMiddleware

app = FastAPI()
app.add_middleware(AllocPolicyMiddleware)  # each request in its own instance of scope "request"


@app.get("/rows")
async def rows(n: int, steps: int = 1):
    """Builds n MiB in `steps` steps, letting other requests run in between."""
    built = []
    for _ in range(steps):
        built.append(bytearray((n << 20) // steps))
        await asyncio.sleep(0)
    return {"mib": sum(len(b) for b in built) >> 20}


@app.get("/report")
def report(n: int):
    """A sync endpoint: FastAPI runs it in a thread, still in the request's instance."""
    return {"length": len(b"x" * n)}


def main() -> None:
    logging.basicConfig(format="log: %(message)s")  # the refusals' log lines
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]

    def send(path):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    print(send("/rows?n=8&steps=4"))
    status, facts = send("/rows?n=200&steps=20")  # grows across awaits past 64 MiB
    print(status, facts["reason"], facts["scope"], facts["budget"])
    status, facts = send("/report?n=10000000000")  # 10 GB in a sync endpoint
    print(status, facts["reason"], facts["scope"], facts["size"])
    print(send("/rows?n=16&steps=2"))  # the server goes on
    server.should_exit = True
    thread.join()


if __name__ == "__main__":
    main()
