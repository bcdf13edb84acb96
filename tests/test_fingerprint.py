"""perft.fingerprint: the base model's content, not its path."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import save_file

from perft.fingerprint import SAMPLE_BYTES, base_fingerprint, recorded_fingerprint


def _model(folder, tensors):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "olmoe", "_name_or_path": str(folder)}))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_moved_copy_matches_and_any_sampled_change_does_not(tmp_path):
    g = torch.Generator().manual_seed(0)
    big = torch.randn(4 * SAMPLE_BYTES, generator=g)  # 64 KiB: head and tail are sampled, the middle is not
    tensors = {"a": torch.randn(8, 8, generator=g), "big": big}
    first = _model(tmp_path / "m", tensors)
    fp = base_fingerprint(first)
    assert fp is not None and fp.startswith("sha256:") and len(fp) == 71
    moved = shutil.copytree(first, tmp_path / "elsewhere")
    cfg = json.loads((moved / "config.json").read_text())
    cfg["_name_or_path"] = "somewhere/else"  # where it was saved from is not content
    (moved / "config.json").write_text(json.dumps(cfg))
    assert base_fingerprint(moved) == fp
    for name, change in (("a", lambda t: t.add(1e-3)), ("big", lambda t: torch.cat([t[:-1], t[-1:] + 1]))):
        changed = shutil.copytree(first, tmp_path / f"changed-{name}")
        save_file({**tensors, name: change(tensors[name])}, str(changed / "model.safetensors"))
        assert base_fingerprint(changed) != fp, name
    cfg["hidden_size"] = 7
    other = shutil.copytree(first, tmp_path / "other-config")
    (other / "config.json").write_text(json.dumps(cfg))
    assert base_fingerprint(other) != fp


def test_hub_names_and_damaged_files_have_no_fingerprint(tmp_path):
    assert base_fingerprint("allenai/OLMoE-1B-7B-0924") is None
    assert base_fingerprint(None) is None
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\xff" * 16)  # header length beyond any real one
    assert base_fingerprint(folder) is None
    assert recorded_fingerprint({"base_shapes": {"fingerprint": "sha256:x"}}) == "sha256:x"
    assert recorded_fingerprint({"base_shapes": []}) is None and recorded_fingerprint([]) is None
