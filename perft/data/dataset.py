"""Instruction data for fine-tuning: load, validate, split and tokenise LLM-Adapters records.

The paper trains on LLM-Adapters' `commonsense_170k.json` / `math_50k.json`: a JSON list of
`{"instruction", "input"?, "output", "answer"?}` records. JSON Lines and the local formats
`datasets` reads (CSV, Parquet, Arrow) hold the same fields. Records are checked up front so
a broken file fails before any model is loaded, with a message naming the record.

Tokenisation follows LLM-Adapters (and so the paper's runs): the full prompt + response is
cut at `cutoff_len` tokens, EOS is appended when there is room, and with
`train_on_inputs=False` the prompt tokens get label -100 so the loss covers the response only.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perft.data.prompts import build_prompt
from perft.errors import PerftError
from perft.io import file_sha256

IGNORE_INDEX = -100
REQUIRED_FIELDS = ("instruction", "output")
OPTIONAL_TEXT_FIELDS = ("input", "answer")
_DATASETS_BUILDERS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


# ---------------------------------------------------------------------------- reading
def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a local data file into a list of dict records (no validation of fields yet)."""
    path = Path(path)
    if not path.exists():
        raise PerftError(f"data file {path} does not exist: check the --data path")
    if path.is_dir():
        raise PerftError(f"data path {path} is a directory: give the JSON / JSONL / CSV / Parquet file itself")
    if not path.is_file():  # a named pipe would block forever, a device never ends
        raise PerftError(f"data path {path} is not a regular file (a named pipe, device or socket): "
                         "save the records to a file and pass that")
    suffix = path.suffix.lower()
    if suffix in _DATASETS_BUILDERS:
        return _load_with_datasets(path, _DATASETS_BUILDERS[suffix])
    text = _read_utf8(path)
    if suffix == ".jsonl" or suffix == ".ndjson":
        return _parse_json_lines(text, path)
    if suffix != ".json":
        raise PerftError(
            f"cannot read {path}: unknown data format {suffix or '(no extension)'!r}; "
            "use .json (a list of records), .jsonl, .csv, .tsv, .parquet or .arrow"
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON Lines saved as .json
            return _parse_json_lines(text, path)
        raise PerftError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            "fix the file or re-export it as a JSON list of records"
        ) from None
    except (ValueError, RecursionError) as err:  # a number of thousands of digits, nesting thousands deep
        raise PerftError(f"{path} is not a usable JSON data file ({err}); fix the file") from None
    if isinstance(data, dict):
        # {"train": [...]} or {"data": [...]} wrappers are common; one list inside is accepted.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise PerftError(
                f"{path} holds a JSON object, not a list of records; give a file whose top level is "
                '[{"instruction": ..., "output": ...}, ...]'
            )
        data = lists[0]
    if not isinstance(data, list):
        raise PerftError(f"{path} holds a JSON {type(data).__name__}, not a list of records")
    return data


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PerftError(
            f"{path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); re-save it as UTF-8"
        ) from None


def _parse_json_lines(text: str, path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise PerftError(f"{path} line {number} is not valid JSON ({err.msg}); fix or remove that line") from None
        except (ValueError, RecursionError) as err:
            raise PerftError(f"{path} line {number} is not usable JSON ({err}); fix or remove that line") from None
    return records


def _load_with_datasets(path: Path, builder: str) -> list[dict[str, Any]]:
    import datasets

    kwargs: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    datasets.disable_progress_bars()  # a local file loads in moments; and --no-progress must hold
    with tempfile.TemporaryDirectory(prefix="perft-data-") as cache:  # keep the user's HF cache clean
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                       keep_in_memory=True, **kwargs)
        except Exception as err:  # datasets raises many types for unreadable files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PerftError(f"cannot read {path} as {builder}: {first}") from None
        return ds.to_list()


# ---------------------------------------------------------------------------- validation
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def validate_records(records: list[Any], source: str = "data") -> list[dict[str, str]]:
    """Check every record and return clean `{"instruction", "input", "output"}` dicts.

    The first bad record stops everything, with its index (0-based, as in the file's list).
    """
    if not records:
        raise PerftError(f"{source} holds no records: the data set is empty")
    clean: list[dict[str, str]] = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise PerftError(
                f"record {index} of {source} is a {type(record).__name__}, not an object with "
                "'instruction' and 'output' fields"
            )
        for name in REQUIRED_FIELDS:
            if name not in record or _missing(record[name]):
                raise PerftError(
                    f"record {index} of {source} has no '{name}' field; every record needs "
                    f"{' and '.join(repr(f) for f in REQUIRED_FIELDS)} (found: {sorted(record)})"
                )
            if not isinstance(record[name], str):
                raise PerftError(
                    f"record {index} of {source}: '{name}' must be text, got {type(record[name]).__name__}"
                )
        if not record["instruction"].strip():
            raise PerftError(f"record {index} of {source} has an empty 'instruction'")
        value = record.get("input")
        if not _missing(value) and not isinstance(value, str):
            raise PerftError(f"record {index} of {source}: 'input' must be text or absent, got {type(value).__name__}")
        for name in ("instruction", "input", "output"):
            text = record.get(name)
            if isinstance(text, str) and not encodable(text):
                raise PerftError(
                    f"record {index} of {source}: '{name}' is not valid Unicode text (it holds an unpaired "
                    "surrogate such as \\ud800); fix the record"
                )
        clean.append({
            "instruction": record["instruction"],
            "input": "" if _missing(value) else value,
            "output": record["output"],
        })
    return clean


def encodable(text: str) -> bool:
    """Text a tokenizer can take: no lone UTF-16 surrogates (JSON allows "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------------------- tokenisation
def tokenize_examples(
    batch: dict[str, list[str]], tokenizer: Any, cutoff_len: int, train_on_inputs: bool, prompt_style: str = "clean"
) -> dict[str, list[list[int]]]:
    """Batched tokenisation of records (a `datasets.map` function).

    Returns input_ids, labels, length and num_targets (label tokens the shifted loss sees).
    """
    full = [build_prompt(i, x, o, style=prompt_style) for i, x, o in zip(batch["instruction"], batch["input"], batch["output"])]
    encoded = tokenizer(full, truncation=True, max_length=cutoff_len, padding=False)["input_ids"]
    eos = tokenizer.eos_token_id
    input_ids = [ids + [eos] if (ids and ids[-1] != eos and len(ids) < cutoff_len) else list(ids) for ids in encoded]
    labels = [list(ids) for ids in input_ids]
    if not train_on_inputs:
        prompts = [build_prompt(i, x, style=prompt_style) for i, x in zip(batch["instruction"], batch["input"])]
        prompt_ids = tokenizer(prompts, truncation=True, max_length=cutoff_len, padding=False)["input_ids"]
        for lab, p in zip(labels, prompt_ids):
            cut = min(len(p), len(lab))
            lab[:cut] = [IGNORE_INDEX] * cut
    return {
        "input_ids": input_ids,
        "labels": labels,
        "length": [len(ids) for ids in input_ids],
        "num_targets": [sum(1 for t in lab[1:] if t != IGNORE_INDEX) for lab in labels],
    }


@dataclass
class PreparedData:
    """Tokenised train / validation sets (`datasets.Dataset`s) and facts for the logs."""

    train: Any
    val: Any | None
    num_records: int
    data_hash: str
    truncated: int  # examples cut at cutoff_len
    no_target: int  # training examples without a single label token left (prompt filled the cutoff)


def split_records(records: list[dict[str, str]], val_set_size: int, seed: int) -> tuple[Any, Any | None]:
    """Hold out `val_set_size` records exactly as LLM-Adapters does (`train_test_split`, shuffled, seed)."""
    import datasets

    ds = datasets.Dataset.from_list(records)
    if val_set_size <= 0:
        return ds, None
    if val_set_size >= len(ds):
        raise PerftError(
            f"val_set_size={val_set_size} leaves no training data (the data set has {len(ds)} records): "
            "lower --val-set-size"
        )
    parts = ds.train_test_split(test_size=val_set_size, shuffle=True, seed=seed)
    return parts["train"], parts["test"]


def prepare_data(
    path: str | Path,
    tokenizer: Any,
    *,
    cutoff_len: int,
    val_set_size: int,
    split_seed: int,
    train_on_inputs: bool,
    max_train_samples: int | None = None,
    prompt_style: str = "clean",
) -> PreparedData:
    """Load, validate, split and tokenise; every failure is a `PerftError` before training starts."""
    path = Path(path)
    records = validate_records(load_records(path), source=str(path))
    train_raw, val_raw = split_records(records, val_set_size, split_seed)
    if max_train_samples is not None and max_train_samples < len(train_raw):
        train_raw = train_raw.select(range(max_train_samples))

    def tokenize(ds: Any) -> Any:
        return ds.map(
            tokenize_examples,
            batched=True,
            remove_columns=ds.column_names,
            fn_kwargs={"tokenizer": tokenizer, "cutoff_len": cutoff_len, "train_on_inputs": train_on_inputs,
                       "prompt_style": prompt_style},
            keep_in_memory=True,
            load_from_cache_file=False,
            desc=None,
        )

    import datasets

    datasets.disable_progress_bars()
    train = tokenize(train_raw)
    val = tokenize(val_raw) if val_raw is not None else None
    lengths = list(train["length"]) + (list(val["length"]) if val is not None else [])
    truncated = sum(1 for n in lengths if n >= cutoff_len)
    no_target = sum(1 for n in train["num_targets"] if n == 0)
    if no_target == len(train):
        raise PerftError(
            f"no training example has a response token within cutoff_len={cutoff_len}: "
            "raise --cutoff-len or pass --train-on-inputs"
        )
    return PreparedData(train, val, len(records), file_sha256(path), truncated, no_target)
