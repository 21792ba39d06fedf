"""A pool's served model names (``InferencePool.spec.servedModelNames``) on the request
path, driven by the real OpenAI SDK: the router sends a request to the pool that lists
its ``model``, ``GET /v1/models`` lists the names, and the fake engine answers to the
same names as vLLM does with ``--served-model-name a b``."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from aiohttp.test_utils import TestServer

from joulepool import settings as settings_base
from joulepool.api import contract
from joulepool.core.profiles import H100_8B
from joulepool.fakes.engine import FakeEngine, build_app
from joulepool.fakes.settings import FakeEngineSettings
from joulepool.router.app import ROUTER, create_app
from joulepool.router.settings import Settings

MODEL = H100_8B.model
NAMES = ["meta-llama/Llama-3.1-8B-Instruct", "chat"]


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[dict[str, object]]:
    named = [TestServer(build_app(FakeEngine(H100_8B), NAMES), host="127.0.0.1")
             for _ in range(2)]
    plain = TestServer(build_app(FakeEngine(H100_8B)), host="127.0.0.1")
    for s in (*named, plain):
        await s.start_server()
    slo = {"ttftSeconds": 5.0, "tpotSeconds": 0.5}
    (tmp_path / "endpoints.json").write_text(json.dumps({"pools": {
        "ns.named": {"model": MODEL, "servedModelNames": NAMES, "slo": slo,
                     "endpoints": [{"address": f"127.0.0.1:{s.port}"} for s in named]},
        "ns.plain": {"model": MODEL, "slo": slo,
                     "endpoints": [{"address": f"127.0.0.1:{plain.port}"}]},
    }}))
    router = TestServer(create_app(Settings(
        cluster=False, scrape_interval_seconds=0, file_poll_seconds=0,
        endpoints_file=tmp_path / "endpoints.json")), host="127.0.0.1")
    await router.start_server()
    yield {"router": router, "named": {f"127.0.0.1:{s.port}" for s in named},
           "plain": f"127.0.0.1:{plain.port}"}
    await router.close()
    for s in (*named, plain):
        await s.close()


async def test_requests_go_to_the_pool_listing_their_model(servers: dict[str, object]) -> None:
    router = servers["router"]
    assert isinstance(router, TestServer)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{router.port}/v1",
                                api_key="unused", max_retries=0)
    try:
        for name in NAMES:
            raw = await client.completions.with_raw_response.create(
                model=name, prompt="hello", max_tokens=3)
            assert raw.headers[contract.SERVED_BY_HEADER] in servers["named"]
            assert raw.parse().model == NAMES[0]  # the engine names its first name
        chat = await client.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert chat.headers[contract.SERVED_BY_HEADER] in servers["named"]
        # the bare model is no longer a name of the pool that lists served names
        raw = await client.completions.with_raw_response.create(
            model=MODEL, prompt="hello", max_tokens=3)
        assert raw.headers[contract.SERVED_BY_HEADER] == servers["plain"]
        models = await client.models.list()
        assert [m.id for m in models.data] == sorted([*NAMES, MODEL])
        with pytest.raises(openai.NotFoundError) as err:
            await client.completions.create(model="llama-70b", prompt="x", max_tokens=2)
        assert "llama-70b" in str(err.value)
    finally:
        await client.close()
    pools = router.app[ROUTER].router.pools
    assert pools["ns.named"].describe(0.0)["servedModelNames"] == NAMES
    # three requests served by the named pool, learned there with no callback
    assert sum(c.completions for c in pools["ns.named"].counts.values()) == 3
    assert sum(c.completions for c in pools["ns.plain"].counts.values()) == 1


def test_fake_engine_takes_several_names_as_vllm_does() -> None:
    parser = argparse.ArgumentParser()
    settings_base.add_arguments(parser, FakeEngineSettings)
    args = parser.parse_args(["--served-model-name", "a", "b/c", "--port", "9"])
    assert settings_base.load(FakeEngineSettings, args, {}).served_model_name == ["a", "b/c"]
    args = parser.parse_args(["--served-model-name", "a", "--served-model-name", "b"])
    assert settings_base.load(FakeEngineSettings, args, {}).served_model_name == ["a", "b"]
    env = {"JOULEPOOL_SERVED_MODEL_NAME": "x y"}
    assert settings_base.load(FakeEngineSettings, None, env).served_model_name == ["x", "y"]
