"""docs/extending.md: each worked example runs as written (in a fresh folder, blocks in order)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from perft.methods import unregister_method
from tests.helpers.training import one_thread

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def section_blocks(title: str) -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    body = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_adding_an_architecture_example_runs(capsys):
    from perft import arch

    blocks = section_blocks("Adding an architecture")
    assert len(blocks) == 1
    torch.manual_seed(0)
    try:
        exec(compile(blocks[0], f"{DOC}:architecture", "exec"), {"__name__": "doc_example"})
    finally:
        arch._REGISTRY.pop("MyMoeBlock", None)


def test_adding_a_method_example_trains_saves_and_loads(tmp_path, monkeypatch, capsys):
    blocks = section_blocks("Adding a method")
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "doc_example"}
    try:
        with one_thread():
            for i, block in enumerate(blocks):
                exec(compile(block, f"{DOC}:method[{i}]", "exec"), namespace)
    finally:
        unregister_method("router-tuning")
    assert capsys.readouterr().out.strip().splitlines()[-1] == "completed 1 router-tuning"
    model, base_path = namespace["model"], namespace["default_base_model_path"]()
    from perft.loading import load_base_model

    base = load_base_model(str(base_path))
    trained = {n: p for n, p in model.named_parameters()}
    changed = {n for n, p in base.named_parameters() if not torch.equal(p, trained[n])}
    assert changed and all(n.endswith("mlp.gate.weight") for n in changed)  # the routers, nothing else
    assert (tmp_path / "runs" / "router-tuning" / "adapter" / "adapter_config.json").is_file()


@pytest.fixture(autouse=True)
def _forget_registrations():
    yield
    unregister_method("router-tuning")
