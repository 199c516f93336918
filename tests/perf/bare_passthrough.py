"""The yardstick for the gateway's request path: a bare Litestar + aiohttp passthrough, nothing else.

    python tests/perf/bare_passthrough.py --port PORT --upstream http://127.0.0.1:SIM_PORT --key PROVIDER_KEY

One route, `POST /openai/{path}`: the body is forwarded to the upstream with the provider key in place
of the client's credential, through one shared aiohttp session, and the answer is returned as it came
(read whole, or relayed chunk by chunk when it is an event stream). Served by uvicorn with the settings
`tollway serve` uses. No token check, policy, limits, metering, metrics or events: what is left is the
cost of serving HTTP and calling the provider, which the gateway's CPU per request is compared with
(`ab_gateway.py --bare`). Not part of the test suite.
"""

from __future__ import annotations

import argparse

import aiohttp
import uvicorn
from litestar import Litestar, Request, Response, post
from litestar.response import Stream

_HOP = {"host", "authorization", "content-length", "connection", "transfer-encoding"}


def build_app(upstream: str, key: str) -> Litestar:
    session: dict[str, aiohttp.ClientSession] = {}

    async def open_session() -> None:
        session["s"] = aiohttp.ClientSession(auto_decompress=False)

    async def close_session() -> None:
        await session["s"].close()

    @post("/openai/{path:path}", status_code=200)
    async def forward(request: Request, path: str) -> Response | Stream:
        headers = {k: v for k, v in request.headers.items() if k not in _HOP}
        headers["Authorization"] = f"Bearer {key}"
        answer = await session["s"].post(f"{upstream}/{path.lstrip('/')}", data=await request.body(), headers=headers)
        content_type = answer.headers.get("Content-Type", "application/json")
        if content_type.startswith("text/event-stream"):
            async def chunks():
                try:
                    async for chunk in answer.content.iter_any():
                        yield chunk
                finally:
                    answer.release()

            return Stream(chunks(), status_code=answer.status, media_type=content_type)
        body = await answer.read()
        answer.release()
        return Response(body, status_code=answer.status, media_type=content_type)

    return Litestar([forward], on_startup=[open_session], on_shutdown=[close_session])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the provider's base URL, e.g. http://127.0.0.1:9000")
    parser.add_argument("--key", required=True, help="the provider key to send upstream")
    args = parser.parse_args()
    uvicorn.run(build_app(args.upstream, args.key), host="127.0.0.1", port=args.port, access_log=False,
                log_level="warning", server_header=False, proxy_headers=False)


if __name__ == "__main__":
    main()
