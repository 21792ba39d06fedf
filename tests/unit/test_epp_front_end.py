"""Choosing the endpoint picker's gRPC front end (``--picker-front-end``): the compiled
one when built, the Python one otherwise, and a clear error naming why when the
compiled one is asked for but cannot serve."""

from __future__ import annotations

import argparse
import logging

import pytest

from joulepool.router import epp_native
from joulepool.router.settings import Settings, SettingsError, add_arguments, load_settings

NOT_BUILT = "the compiled ext_proc front end is not built (test)"


def _load(*flags: str) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load_settings(parser.parse_args(list(flags)), environ={})


def test_auto_serves_the_compiled_front_end_when_built(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    monkeypatch.setattr(epp_native, "UNAVAILABLE", None)
    assert _load().picker_front_end == "auto"
    assert epp_native.front_end("auto") == "native"
    assert epp_native.front_end("python") == "python"


def test_auto_falls_back_to_python_and_says_why(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(epp_native, "UNAVAILABLE", NOT_BUILT)
    with caplog.at_level(logging.WARNING, "joulepool.router.epp"):
        assert epp_native.front_end("auto") == "python"
    assert NOT_BUILT in caplog.text


def test_native_asked_for_but_not_built_is_a_settings_error(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setattr(epp_native, "UNAVAILABLE", NOT_BUILT)
    with pytest.raises(SettingsError, match=r"picker-front-end.*not built"):
        _load("--picker-front-end", "native")
    with pytest.raises(RuntimeError, match="not built"):
        epp_native.front_end("native")
    assert _load("--picker-front-end", "python").picker_front_end == "python"


def test_an_unknown_front_end_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="picker-front-end"):
        _load("--picker-front-end", "rust")
