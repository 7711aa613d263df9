"""The limit for serving benchmarks: a FastAPI app that reads and parses a predict body, then
answers a constant, under the uvicorn settings `streamlearn serve` uses (h11, one worker).

    python bare_endpoint.py PORT
"""

import sys

import orjson
import uvicorn
from fastapi import FastAPI, Request, Response

app = FastAPI()
ANSWER = b'{"predictions": [0], "model_name": "default", "model_version": 1}'


@app.post("/v1/models/default:predict")
async def predict(request: Request) -> Response:
    orjson.loads(await request.body())
    return Response(ANSWER, media_type="application/json")


@app.get("/readyz")
async def readyz() -> dict[str, bool]:
    return {"ready": True}


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        http="h11",
        ws="none",
        log_level="warning",
        access_log=False,
    )
