"""`perft analyze` end to end on tiny files (with the paper's UMAP projection), and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from perft import PerftConfig, get_perft_model
from perft.cli import main
from perft.cli.analyze import parse_layers
from perft.errors import PerftError
from perft.loading import load_base_model
from perft.testing import save_tiny_model, save_tiny_tokenizer

WORDS = "one two three four five six seven eight nine ten".split()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model("mixtral", root / "model")
    save_tiny_tokenizer(root / "model", [" ".join(WORDS)])
    records = [{"instruction": " ".join(WORDS[i : i + 4]), "input": "", "output": WORDS[i], "kind": i % 2}
               for i in range(6)]
    (root / "data.json").write_text(json.dumps(records))
    torch.manual_seed(0)
    base = load_base_model(str(root / "model"), dtype="float32")
    model = get_perft_model(base, PerftConfig(variant="routed", num_experts=3, top_k=1, rank=2, dropout=0.0))
    model.save_pretrained(root / "adapter")
    model.save_pretrained(root / "run" / "checkpoint-5")
    model.save_pretrained(root / "run" / "checkpoint-10")
    return root


def test_analyze_end_to_end_with_umap(files, tmp_path, capsys):
    out = tmp_path / "analysis"
    rc = main(["analyze", "--model", str(files / "model"), "--adapter", str(files / "adapter"),
               "--data", str(files / "data.json"), "--output", str(out), "--split-by", "kind",
               "--checkpoints", str(files / "run"), "--layers", "0-1", "--projection-layers", "1",
               "--batch-size", "4", "--max-samples", "5", "--keys-per-expert", "4", "--no-progress",
               "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert "report.html" in capsys.readouterr().out
    result = json.loads((out / "analysis.json").read_text())
    assert result["num_samples"] == 5 and result["groups"] == ["0", "1"]
    assert result["checkpoints"]["steps"] == [5, 10]
    umap = result["projection"]["layers"]["1"]
    assert result["projection"]["method"] == "umap" and list(result["projection"]["layers"]) == ["1"]
    assert len(umap["base_experts"]) == 4 and len(umap["base_keys"]) == 4 * 4
    assert len(umap["runs"]["adapter"]["experts"]) == 3 and len(umap["runs"]["adapter"]["keys"]) == 3 * 2
    assert all(len(p) == 2 for p in umap["base_keys"])
    assert (out / "report.html").is_file() and (out / "figures" / "projection.png").is_file()


@pytest.mark.parametrize(
    "change,message",
    [
        ({"--data": "missing.json"}, "does not exist"),
        ({"--adapter": "nowhere"}, "adapter directory"),
        ({"--split-by": "no_such_field"}, "no record"),
        ({"--layers": "1-x"}, "cannot read layers"),
        ({"--layers": "7"}, "has 2 layers"),
        ({"--checkpoints": "data.json"}, "checkpoint directory"),
        ({"--batch-size": "0"}, "batch-size"),
    ],
)
def test_bad_input_is_one_line_error(files, tmp_path, capsys, change, message):
    args = {"--model": str(files / "model"), "--adapter": str(files / "adapter"), "--data": str(files / "data.json"),
            "--output": str(tmp_path / "out"), "--projection": "none"}
    for key, value in change.items():
        args[key] = value if key in ("--layers", "--split-by", "--batch-size") else str(files / value)
    argv = ["analyze", "--no-progress", "--device", "cpu"] + [x for kv in args.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("perft analyze: error:") and message in err


def test_bad_data_records(tmp_path, files, capsys):
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "no instruction"}]))
    argv = ["analyze", "--model", str(files / "model"), "--data", str(tmp_path / "bad.json"),
            "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "instruction" in capsys.readouterr().err


def test_parse_layers():
    assert parse_layers("0,3,5-7") == [0, 3, 5, 6, 7]
    assert parse_layers(None) is None
    for bad in ("a", "3-1", "-2"):
        with pytest.raises(PerftError):
            parse_layers(bad)
