"""Calling a test extender's scheduler verbs over HTTP (aiohttp's test client)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp.test_utils import TestClient

from joulepool.extender.app import EXTENDER, Extender


def extender_of(client: TestClient) -> Extender:
    """The :class:`Extender` behind the test client's app."""
    return client.server.app[EXTENDER]


async def post_verb(client: TestClient, verb: str, body: Any) -> Any:
    """POST ``body`` to ``/scheduler/<verb>``; the answer's JSON, after checking what
    kube-scheduler relies on: 200, a JSON content type, and the Server-Timing header."""
    resp = await client.post(f"/scheduler/{verb}", data=json.dumps(body),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["Server-Timing"].startswith("app;dur=")
    return await resp.json()
