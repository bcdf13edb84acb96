"""`perft analyze`: routing statistics, the key-memory projection and router geometry, as a report.

Inputs (data file, adapter folders, checkpoint folder, options) are checked before the
model is loaded. Output: `analysis.json`, `figures/*.png` and a self-contained
`report.html` in the output folder. See docs/analysis.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from perft.cli.device import check_device
from perft.errors import PerftError
from perft.quantization import add_quantization_arguments, quantization_kwargs


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="analyse routing: expert utilisation, balance, co-occurrence, key-memory projection",
        description=(
            "Record how tokens are routed to the base experts and to the PERFT adapter experts on a data file, "
            "project expert vectors and key memory vectors (the paper's figures), follow the PERFT-R router "
            "over a run's checkpoints, and write analysis.json, PNG figures and a one-page report.html."
        ),
    )
    parser.add_argument("--model", required=True, help="base model: a local folder or a hub name")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="adapter folder (PERFT, ESFT, a hybrid, ...) or `perft train` run folder (its adapter/); repeat to compare runs side by side (none: the base model)")
    parser.add_argument("--data", required=True, help="LLM-Adapters JSON records (instruction, input, output)")
    parser.add_argument("--output", required=True, help="output folder (analysis.json, figures/, report.html)")
    parser.add_argument("--overwrite-output-dir", action="store_true",
                        help="if --output holds files perft did not write, move that folder aside first")
    parser.add_argument("--split-by", default=None, metavar="FIELD", help="also report statistics per value of FIELD")
    parser.add_argument("--layers", default=None, help="MoE layer indices to analyse, e.g. 0,1,15 or 12-15 (default: all)")
    parser.add_argument("--projection-layers", default=None,
                        help="layers for the projection and co-occurrence figures (default: the last two analysed)")
    parser.add_argument("--checkpoints", default=None, metavar="RUN_DIR",
                        help="training run folder with checkpoint-*/ adapters: PERFT-R router geometry over steps")
    parser.add_argument("--projection", choices=("umap", "pca", "none"), default="umap",
                        help="2-D projection of expert/key vectors: umap (paper), pca (fast), none")
    parser.add_argument("--keys-per-expert", type=int, default=64,
                        help="up-projection rows sampled per base expert for the projection (0 = all)")
    parser.add_argument("--with-base", action="store_true", help="also analyse the base model without adapters")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=None, help="use only the first N records")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sample (default 256, as training)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder/name (default: the model's)")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, bfloat16, float16, float32")
    add_quantization_arguments(parser)
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the key sampling and of UMAP")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def parse_layers(text: str | None) -> list[int] | None:
    """'0,3,5-7' -> [0, 3, 5, 6, 7]."""
    if text is None or not text.strip():
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                lo, hi = part.split("-", 1)
                if int(lo) > int(hi):
                    raise ValueError(part)
                layers.extend(range(int(lo), int(hi) + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise PerftError(f"cannot read layers {text!r}: use indices and ranges like 0,3,12-15") from None
    if not layers or any(i < 0 for i in layers):
        raise PerftError(f"cannot read layers {text!r}: use non-negative indices and ranges like 0,3,12-15")
    return sorted(set(layers))


def _check_layers_exist(model: str, layers: list[int]) -> None:
    """Catch a layer index beyond the model's depth from its config.json, before the load."""
    config_path = Path(model) / "config.json"
    if not layers or not config_path.is_file():
        return
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return  # the model load reports it
    if not isinstance(config, dict):
        return
    depth = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
    if isinstance(depth, int) and max(layers) >= depth:
        raise PerftError(f"layer {max(layers)} does not exist: {model} has {depth} layers (0-{depth - 1})")


def run(args: argparse.Namespace) -> int:

    from perft.analysis.data import prepare_data
    from perft.analysis.geometry import find_checkpoints
    from perft.analysis.pipeline import AnalysisOptions, check_adapter_dir

    options = AnalysisOptions(
        split_by=args.split_by,
        layers=parse_layers(args.layers),
        projection_layers=parse_layers(args.projection_layers),
        checkpoints=args.checkpoints,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        max_length=args.max_length,
        projection=None if args.projection == "none" else args.projection,
        keys_per_expert=args.keys_per_expert,
        with_base=args.with_base,
        seed=args.seed,
        progress=not args.no_progress,
    )
    options.validate()
    # Fail on bad inputs before the (slow) model load.
    prepare_data(args.data, split_by=args.split_by, max_samples=args.max_samples)
    from perft.evaluation.adapter_dirs import resolve_adapter_dir
    from perft.methods import check_adapter_matches

    args.adapter = [resolve_adapter_dir(adapter) for adapter in args.adapter]
    for adapter in args.adapter:
        check_adapter_dir(adapter)
        check_adapter_matches(args.model, adapter, command="perft analyze")
    if args.checkpoints:
        find_checkpoints(args.checkpoints)
    check_device(args.device)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise PerftError(f"--output {output} exists and is not a folder")
    from perft.output_dir import OutputFolder

    with OutputFolder(output, "analyze", overwrite=args.overwrite_output_dir,
                      legacy=(output / "analysis.json").is_file()) as claimed:
        return _analyze(args, options, output, claimed)


def _analyze(args: argparse.Namespace, options: Any, output: Path, claimed: Any) -> int:
    """The model load and the analysis itself, in a claimed and locked output folder."""
    import torch

    from perft.analysis.pipeline import analyze
    from perft.analysis.report import write_report
    from perft.loading import load_base_model, load_tokenizer

    _check_layers_exist(args.model, (options.layers or []) + (options.projection_layers or []))
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    device = torch.device(check_device(args.device))
    model = load_base_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                            **quantization_kwargs(args))
    model.to(device).eval()
    tokenizer = load_tokenizer(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    result = analyze(model, tokenizer, args.data, args.adapter, options, model_name=args.model)
    claimed.begin()
    written = write_report(result, output)
    print(f"wrote {written['html']} ({len(written) - 2} figures, numbers in {written['json']})")
    return 0
