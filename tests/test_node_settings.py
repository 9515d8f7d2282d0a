"""The node's seat count follows its engine unless set (flag, env or file)."""

from __future__ import annotations

import pytest

from inference_node.config import DEFAULT_MAX_SEQUENCES, NodeSettings
from sluice.runtime.settings import parse_settings


def test_seats_default_by_engine_and_any_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NodeSettings().max_sequences == DEFAULT_MAX_SEQUENCES["builtin"] == 32
    assert NodeSettings(engine="vllm").max_sequences == DEFAULT_MAX_SEQUENCES["vllm"] == 64
    assert parse_settings(NodeSettings, ["--engine", "vllm"], "").max_sequences == 64
    flagged = parse_settings(NodeSettings, ["--engine", "vllm", "--max-sequences", "16"], "")
    assert flagged.max_sequences == 16
    monkeypatch.setenv("SLUICE_ENGINE", "vllm")
    assert NodeSettings().max_sequences == 64
    monkeypatch.setenv("SLUICE_MAX_SEQUENCES", "8")
    assert NodeSettings().max_sequences == 8
