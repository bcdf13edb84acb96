"""Bad input: 80 distinct bad inputs to `perft train` / `perft eval` / `perft analyze`, their
YAML configs, data files, model/tokenizer/adapter folders, checkpoints and the Python API.

Every CLI case must exit with status 2 and print exactly one line on stderr,
`perft <command>: error: ...`, holding the fragment that names the problem (never a
traceback), and must leave the files it was given, and the output folder, byte for byte and
mtime for mtime as they were. Property-based tests (hypothesis) check that config
validation and data loading either accept an input or refuse it with a `PerftError`, never
with any other exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from perft.errors import PerftError
from perft.output_dir import MARKER_NAME
from tests.helpers.cli import Env, eval_argv, make_env, run_cli, train_argv, write_task
from tests.helpers.cli import analyze_argv as cli_analyze_argv
from tests.helpers.hostile import CRASH_MARK, byte_snapshot
from tests.helpers.hostile import record as record_case
from tests.helpers.training import PYTHON, config, one_thread, subprocess_env

# ---------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    """A finished 4-step run (checkpoint-2, checkpoint-4, adapter/) and a 4-item eval task."""
    return make_env(tmp_path_factory.mktemp("inputs"), n_records=24, max_steps=4, save_steps=2, test_items=4)


def snapshot(root: Path) -> dict[str, Any] | None:
    """Every file under `root` (or `root` itself): content hash and mtime; links by target."""
    return byte_snapshot(root, mtimes=True)


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Make `directory` unwritable, even for root (via the immutable attribute)."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr: cannot make a folder read-only")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(directory)], capture_output=True)
    else:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def edit_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def truncate(path: Path, size: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:size])


DEEP = "[" * 100_000 + "]" * 100_000  # nesting deeper than Python's recursion limit
BIG = "9" * 5000  # more digits than Python converts to int


# ---------------------------------------------------------------------------- the cases


@dataclass
class Case:
    argv: list[str]
    message: str  # fragment of the one-line error
    watch: list[Path]  # files and folders that must not change (the output folder among them)


def existing_output(tmp: Path, kind: str = "train") -> Path:
    """An earlier perft output folder of `kind` (by its marker) holding one of the user's own files."""
    out = tmp / "out"
    out.mkdir()
    (out / MARKER_NAME).write_text(json.dumps({"kind": kind, "written_by": "perft"}))
    (out / "notes.txt").write_text("the user's own file")
    return out


def train_with(env: Env, tmp: Path, message: str, *extra: str, inputs: list[Path] = ()) -> Case:
    out = existing_output(tmp)
    return Case(train_argv(env, out, *extra), message, [out, *inputs])


def yaml_case(env: Env, tmp: Path, body: str | bytes, message: str) -> Case:
    base = (f"model: {env.model}\ndata: {env.data}\nmax_steps: 2\nreport_to: none\nbatch_size: 4\n"
            "micro_batch_size: 2\nrank: 4\nval_set_size: 4\neval_steps: 2\nsave_steps: 2\n")
    path = tmp / "config.yaml"
    path.write_bytes(base.encode() + (body.encode() if isinstance(body, str) else body))
    out = existing_output(tmp)
    return Case(["train", "--config", str(path), "--output", str(out), "--no-progress"], message, [out, path])


def data_case(env: Env, tmp: Path, name: str, content: bytes, message: str) -> Case:
    path = tmp / name
    path.write_bytes(content)
    return train_with(env, tmp, message, "--data", str(path), inputs=[path])


def model_case(env: Env, tmp: Path, change: Callable[[Path], None], message: str, flag: str = "--model") -> Case:
    model = copy(env.model, tmp / "model")
    change(model)
    return train_with(env, tmp, message, flag, str(model), inputs=[model])


def resume_case(env: Env, tmp: Path, change: Callable[[Path], None], message: str) -> Case:
    run = copy(env.run, tmp / "run")
    change(run / "checkpoint-2")
    argv = ["train", "--config", str(env.run / "training_config.yaml"), "--output", str(run), "--resume",
            str(run / "checkpoint-2"), "--no-progress"]
    return Case(argv, message, [run])


def adapter_case(env: Env, tmp: Path, change: Callable[[Path], None], message: str) -> Case:
    adapter = copy(env.adapter, tmp / "adapter")
    change(adapter)
    out = tmp / "eval-out"
    return Case(eval_argv(env, out, "--adapter", str(adapter)), message, [out, adapter])


def task_case(env: Env, tmp: Path, sidecar: dict[str, Any] | bytes, message: str, test: bytes | None = None) -> Case:
    dataset = tmp / "dataset"
    write_task(dataset, "mytask", sidecar, test)
    out = tmp / "eval-out"
    argv = eval_argv(env, out, "--tasks", "mytask", "--data-dir", str(dataset))
    return Case(argv, message, [out, dataset])


def eval_output_case(env: Env, tmp: Path, name: str, content: bytes, message: str) -> Case:
    out = existing_output(tmp, "eval")
    (out / name).write_bytes(content)
    return Case(eval_argv(env, out), message, [out])


def analyze_argv(env: Env, out: Path, *extra: str) -> list[str]:
    return cli_analyze_argv(env, out, *extra, projection="pca")


def analyze_data_case(env: Env, tmp: Path, content: str, message: str) -> Case:
    path = tmp / "records.json"
    path.write_text(content)
    out = existing_output(tmp, "analyze")
    return Case(analyze_argv(env, out, "--data", str(path)), message, [out, path])


def remote_code_model(directory: Path, marker: Path) -> Path:
    """A model folder whose config needs its own Python code, which would create `marker`."""
    config_path = directory / "config.json"
    config_data = json.loads(config_path.read_text())
    config_data.update(model_type="perft_remote_test",
                       auto_map={"AutoConfig": "remote.RemoteConfig", "AutoModelForCausalLM": "remote.RemoteModel"})
    config_path.write_text(json.dumps(config_data))
    (directory / "remote.py").write_text(
        f"open({str(marker)!r}, 'w').write('remote code ran')\n"
        "from transformers import OlmoeConfig, OlmoeForCausalLM\n"
        "class RemoteConfig(OlmoeConfig):\n    model_type = 'perft_remote_test'\n"
        "class RemoteModel(OlmoeForCausalLM):\n    config_class = RemoteConfig\n"
    )
    return directory


def no_pad_tokenizer(source: Path, target: Path, *, eos: bool) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source))
    tok.pad_token = None
    if not eos:
        tok.eos_token = None
    tok.save_pretrained(str(target))


def _first_tensor(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def apply(tensors: dict[str, torch.Tensor]) -> None:
        key = sorted(tensors)[0]
        tensors[key] = change(tensors[key]).contiguous()
    return apply


def _moments(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def apply(tensors: dict[str, torch.Tensor]) -> None:
        key = sorted(k for k in tensors if k.endswith("::exp_avg"))[0]
        tensors[key] = change(tensors[key]).contiguous()
    return apply


CASES: dict[str, Callable[[Env, Path], Case]] = {
    # ---- YAML config files
    "yaml_logging_dir_outside_output": lambda e, t: yaml_case(e, t, "logging_dir: ../../etc\n",
                                                              "'logging_dir', which perft does not take"),
    "yaml_nested_100k_deep": lambda e, t: yaml_case(e, t, f"layers: {DEEP}\n",
                                                    "is not a usable YAML config: maximum recursion depth"),
    "yaml_5000_digit_integer": lambda e, t: yaml_case(e, t, f"seed: {BIG}\n",
                                                      "is not a usable YAML config: Exceeds the limit"),
    "yaml_not_utf8": lambda e, t: yaml_case(e, t, b"run_name: caf\xe9\n", "is not UTF-8 text"),
    "yaml_python_object_tag": lambda e, t: yaml_case(e, t, "rank: !!python/object/apply:os.system ['true']\n",
                                                     "could not determine a constructor"),
    "yaml_rank_as_string": lambda e, t: yaml_case(e, t, "rank: '4'\n", "rank must be an integer >= 1, got '4'"),
    "yaml_negative_warmup": lambda e, t: yaml_case(e, t, "warmup_steps: -3\n",
                                                   "warmup_steps must be an integer >= 0, got -3"),
    "yaml_seed_beyond_32_bits": lambda e, t: yaml_case(e, t, "seed: 100000000000000000000\n",
                                                       "seed must be an integer <= 4294967295"),
    "yaml_cutoff_len_huge": lambda e, t: yaml_case(e, t, "cutoff_len: 100000000000000000000000\n",
                                                   "cutoff_len must be an integer <= 2147483647"),
    "yaml_model_is_a_list": lambda e, t: yaml_case(e, t, "model: [a, b]\n", "model must be text, got ['a', 'b']"),
    "yaml_lr_nan": lambda e, t: yaml_case(e, t, "lr: .nan\n", "lr must be a finite number > 0, got nan"),
    "yaml_batch_size_float": lambda e, t: yaml_case(e, t, "batch_size: 4.0\n",
                                                    "batch_size must be an integer >= 1, got 4.0"),
    "yaml_layers_not_a_list": lambda e, t: yaml_case(e, t, "layers: 1\n", "layers must be a list of layer indices"),
    "yaml_rank_10_to_the_12": lambda e, t: yaml_case(e, t, "rank: 1000000000000\n",
                                                     "cannot allocate the adapter weights (rank=1000000000000"),
    "yaml_top_level_list": lambda e, t: Case(
        ["train", "--config", str(_write(t / "c.yaml", "- rank\n- 4\n")), "--output", str(t / "out")],
        "must hold a mapping of settings, got list", [t / "out", t / "c.yaml"]),
    "yaml_config_is_a_directory": lambda e, t: Case(
        ["train", "--config", str(t), "--output", str(t / "out")], "is a directory: give the YAML file itself",
        [t]),
    # ---- data files
    "data_latin1_bytes": lambda e, t: data_case(e, t, "d.json", b'[{"instruction": "caf\xe9", "output": "b"}]',
                                                "is not UTF-8 text (byte 0xe9"),
    "data_utf16": lambda e, t: data_case(e, t, "d.json", e.data.read_text().encode("utf-16"),
                                         "is not UTF-8 text (byte 0xff at offset 0)"),
    "data_nested_100k_deep": lambda e, t: data_case(e, t, "d.json", DEEP.encode(),
                                                    "is not a usable JSON data file (maximum recursion depth"),
    "data_5000_digit_number": lambda e, t: data_case(
        e, t, "d.json", f'[{{"instruction": "a", "output": "b", "n": {BIG}}}]'.encode(), "Exceeds the limit"),
    "data_lone_surrogate": lambda e, t: data_case(e, t, "d.json", b'[{"instruction": "a\\ud800", "output": "b"}]',
                                                  "'instruction' is not valid Unicode text"),
    "data_jsonl_surrogate_in_output": lambda e, t: data_case(
        e, t, "d.jsonl", b'{"instruction": "a", "output": "ok"}\n{"instruction": "a", "output": "\\udfff"}\n',
        "record 1 of"),
    "data_output_is_a_number": lambda e, t: data_case(e, t, "d.json", b'[{"instruction": "a", "output": 7}]',
                                                      "'output' must be text, got int"),
    "data_blank_instruction": lambda e, t: data_case(e, t, "d.json", b'[{"instruction": " \\t", "output": "b"}]',
                                                     "has an empty 'instruction'"),
    "data_corrupt_parquet": lambda e, t: data_case(e, t, "d.parquet", b"PAR1 this is no parquet",
                                                   "as parquet: Parquet magic bytes not found"),
    "data_is_a_directory": lambda e, t: train_with(e, t, "is a directory", "--data", str(e.root)),
    "data_dangling_symlink": lambda e, t: train_with(e, t, "does not exist", "--data",
                                                     str(_link(t / "d.json", t / "nowhere.json"))),
    "data_symlink_loop": lambda e, t: train_with(e, t, "does not exist", "--data",
                                                 str(_link(t / "loop.json", t / "loop.json"))),
    # ---- models and tokenizers
    "model_truncated_safetensors": lambda e, t: model_case(
        e, t, lambda m: truncate(m / "model.safetensors", 1000), "safetensors weights are truncated or corrupted"),
    "model_pickle_weights_only": lambda e, t: model_case(
        e, t, lambda m: (m / "model.safetensors").rename(m / "pytorch_model.bin"),
        "holds only pickle-based weights (pytorch_model.bin), which perft refuses to load"),
    "model_weights_contradict_config": lambda e, t: model_case(
        e, t, lambda m: edit_tensors(m / "model.safetensors", _first_tensor(lambda x: x[:3])),
        "the shapes of its weights do not match its config.json"),
    "model_config_not_json": lambda e, t: model_case(e, t, lambda m: (m / "config.json").write_text("{oops"),
                                                     "is not a valid JSON file"),
    "model_architecture_from_the_future": lambda e, t: model_case(
        e, t, lambda m: edit_json(m / "config.json", lambda c: {**c, "model_type": "olmoe_v9"}),
        "Transformers does not recognize this architecture"),
    "model_negative_hidden_size": lambda e, t: model_case(
        e, t, lambda m: edit_json(m / "config.json", lambda c: {**c, "hidden_size": -5}),
        "negative dimension -5"),
    "model_needs_remote_code": lambda e, t: model_case(
        e, t, lambda m: remote_code_model(m, t / "remote-code-ran"), "contains custom code"),
    "tokenizer_without_pad_and_eos": lambda e, t: train_with(
        e, t, "has neither a pad nor an EOS token", "--tokenizer",
        str(_call(no_pad_tokenizer, e.model, t / "tok", eos=False, ret=t / "tok"))),
    "tokenizer_corrupt_json": lambda e, t: model_case(
        e, t, lambda m: (m / "tokenizer.json").write_text("{oops"), "cannot load the tokenizer of", "--tokenizer"),
    # ---- output folders
    "output_parent_is_a_file": lambda e, t: Case(train_argv(e, _write(t / "f", "x") / "out"),
                                                 "is a file, not a folder", [t]),
    "output_is_a_file": lambda e, t: Case(train_argv(e, _write(t / "f", "x")), "exists and is not a folder",
                                          [t]),
    # ---- resuming from damaged checkpoints
    "ckpt_truncated_optimizer": lambda e, t: resume_case(e, t, lambda c: truncate(c / "optimizer.safetensors"),
                                                         "optimizer.safetensors is not a readable safetensors"),
    "ckpt_truncated_adapter": lambda e, t: resume_case(e, t, lambda c: truncate(c / "adapter_model.safetensors"),
                                                       "adapter_model.safetensors is not a readable safetensors"),
    "ckpt_optimizer_json_empty_object": lambda e, t: resume_case(
        e, t, lambda c: (c / "optimizer.json").write_text("{}"), "optimizer.json/optimizer.safetensors is damaged"),
    "ckpt_scheduler_garbage": lambda e, t: resume_case(
        e, t, lambda c: (c / "scheduler.json").write_text('{"last_epoch": "x"}'), "scheduler.json is damaged"),
    "ckpt_rng_state_wrong_size": lambda e, t: resume_case(
        e, t, lambda c: edit_tensors(c / "rng_state_0.safetensors",
                                     lambda d: d.update(torch=torch.zeros(3, dtype=torch.uint8))),
        "rng_state_0.safetensors is damaged"),
    "ckpt_from_a_newer_perft": lambda e, t: resume_case(
        e, t, lambda c: edit_json(c / "trainer_state.json", lambda s: {**s, "format_version": 99}),
        "was written by a newer perft"),
    "ckpt_state_step_not_a_number": lambda e, t: resume_case(
        e, t, lambda c: edit_json(c / "trainer_state.json", lambda s: {**s, "global_step": "six"}),
        "is damaged (global_step 'six')"),
    "ckpt_state_is_a_list": lambda e, t: resume_case(
        e, t, lambda c: (c / "trainer_state.json").write_text("[1, 2]"), "is damaged (a JSON list, not an object)"),
    "ckpt_optimizer_moment_wrong_shape": lambda e, t: resume_case(
        e, t, lambda c: edit_tensors(c / "optimizer.safetensors", _moments(lambda x: x.reshape(-1)[:3])),
        "has shape (3,) but the parameter has"),
    "ckpt_optimizer_moment_nan": lambda e, t: resume_case(
        e, t, lambda c: edit_tensors(c / "optimizer.safetensors", _moments(lambda x: torch.full_like(x, torch.nan))),
        "contains NaN or Inf; resume from an older checkpoint"),
    "ckpt_adapter_integer_tensor": lambda e, t: resume_case(
        e, t, lambda c: edit_tensors(c / "adapter_model.safetensors", _first_tensor(lambda x: x.to(torch.int64))),
        "has dtype torch.int64, not a floating-point type"),
    "ckpt_optimizer_as_pickle": lambda e, t: resume_case(
        e, t, lambda c: (c / "optimizer.safetensors").rename(c / "optimizer.pt"),
        "refusing the pickle-based optimizer.pt next to it"),
    # ---- adapter folders given to perft eval
    "adapter_from_a_newer_perft": lambda e, t: adapter_case(
        e, t, lambda a: edit_json(a / "adapter_config.json", lambda c: {**c, "format_version": 2}),
        "written by a newer perft (format 2"),
    "adapter_format_version_string": lambda e, t: adapter_case(
        e, t, lambda a: edit_json(a / "adapter_config.json", lambda c: {**c, "format_version": "1"}),
        "format_version must be an integer, got '1'"),
    "adapter_config_nested_100k_deep": lambda e, t: adapter_case(
        e, t, lambda a: (a / "adapter_config.json").write_text(DEEP), "is not valid JSON (maximum recursion depth"),
    "adapter_config_5000_digit_rank": lambda e, t: adapter_case(
        e, t, lambda a: (a / "adapter_config.json").write_text(f'{{"rank": {BIG}}}'),
        "is not valid JSON (Exceeds the limit"),
    "adapter_base_shapes_wrong_type": lambda e, t: adapter_case(
        e, t, lambda a: edit_json(a / "adapter_config.json", lambda c: {**c, "base_shapes": [1, 2]}),
        "base_shapes must be a mapping, got list"),
    "adapter_unknown_field": lambda e, t: adapter_case(
        e, t, lambda a: edit_json(a / "adapter_config.json", lambda c: {**c, "lora_magic": 1}),
        "unknown PERFT config field(s) ['lora_magic']"),
    "adapter_for_a_wider_model": lambda e, t: adapter_case(
        e, t, lambda a: edit_json(a / "adapter_config.json",
                                  lambda c: {**c, "base_shapes": {**c["base_shapes"], "hidden_size": 64}}),
        "was built for hidden_size=64"),
    "adapter_truncated_weights": lambda e, t: adapter_case(
        e, t, lambda a: truncate(a / "adapter_model.safetensors", 50), "it may be truncated or corrupted"),
    "adapter_empty_weights_file": lambda e, t: adapter_case(
        e, t, lambda a: (a / "adapter_model.safetensors").write_bytes(b""), "header too small"),
    "adapter_pickle_weights_only": lambda e, t: adapter_case(
        e, t, lambda a: (a / "adapter_model.safetensors").rename(a / "adapter_model.bin"),
        "only the pickle-based adapter_model.bin, which perft refuses to load"),
    "adapter_weights_symlink_to_text": lambda e, t: adapter_case(
        e, t, lambda a: _relink(a / "adapter_model.safetensors", e.data), "is not a readable safetensors file"),
    "adapter_config_symlink_to_a_folder": lambda e, t: adapter_case(
        e, t, lambda a: _relink(a / "adapter_config.json", e.root), "no adapter_config.json in"),
    "adapter_integer_tensors": lambda e, t: adapter_case(
        e, t, lambda a: edit_tensors(a / "adapter_model.safetensors", _first_tensor(lambda x: x.to(torch.int32))),
        "has dtype torch.int32, not a floating-point type"),
    "adapter_extra_tensor": lambda e, t: adapter_case(
        e, t, lambda a: edit_tensors(a / "adapter_model.safetensors", lambda d: d.update(evil=torch.zeros(1))),
        "unexpected tensors ['evil']"),
    # ---- evaluation data and output folders
    "eval_test_file_not_utf8": lambda e, t: task_case(
        e, t, {"answer_type": "choice", "choices": ["red", "blue"]}, "is not UTF-8 text",
        test=b'[{"instruction": "caf\xe9", "answer": "red"}]'),
    "eval_test_file_nested_100k_deep": lambda e, t: task_case(
        e, t, {"answer_type": "choice", "choices": ["red", "blue"]}, "is not a usable JSON data file",
        test=DEEP.encode()),
    "eval_task_file_not_utf8": lambda e, t: task_case(e, t, b'{"answer_type": "caf\xe9"}', "cannot read task file"),
    "eval_task_name_escapes_the_output": lambda e, t: task_case(
        e, t, {"name": "../escaped", "answer_type": "choice", "choices": ["red", "blue"]},
        "task name '../escaped' is not a plain file name"),
    "eval_task_max_new_tokens_negative": lambda e, t: task_case(
        e, t, {"answer_type": "choice", "choices": ["red", "blue"], "max_new_tokens": -3},
        "max_new_tokens must be a positive integer"),
    "eval_output_parent_is_a_file": lambda e, t: Case(eval_argv(e, _write(t / "f", "x") / "out"),
                                                      "is a file, not a folder", [t]),
    "eval_run_record_not_utf8": lambda e, t: eval_output_case(e, t, "run.json", b"\xff\xfe", "is unreadable"),
    "eval_results_not_utf8": lambda e, t: eval_output_case(e, t, "colours.jsonl", b"\xff\xfe\n",
                                                           "is not UTF-8 text; delete the file"),
    "eval_compare_summary_not_utf8": lambda e, t: Case(
        ["eval", "--compare", str(_write(t / "summary.json", b"\xff"))], "is not a readable summary", [t]),
    "eval_batch_size_zero": lambda e, t: Case(eval_argv(e, t / "out", "--batch-size", "0"),
                                              "--batch-size must be at least 1", [t]),
    # ---- perft analyze
    "analyze_seed_negative": lambda e, t: Case(analyze_argv(e, existing_output(t, "analyze"), "--seed", "-1"),
                                               "--seed must be in [0, 2**32 - 1], got -1", [t]),
    "analyze_data_nested_100k_deep": lambda e, t: analyze_data_case(e, t, DEEP,
                                                                    "is not a usable JSON data file (maximum recursion depth"),
    "analyze_data_lone_surrogate": lambda e, t: analyze_data_case(e, t, '[{"instruction": "\\ud800"}]',
                                                                  "is not valid Unicode text"),
    "analyze_output_parent_is_a_file": lambda e, t: Case(analyze_argv(e, _write(t / "f", "x") / "out"),
                                                         "is a file, not a folder", [t]),
    "analyze_corrupt_checkpoint": lambda e, t: Case(
        analyze_argv(e, existing_output(t, "analyze"), "--adapter", str(e.adapter), "--checkpoints",
                     str(_call(_corrupt_run, e.run, t / "run", ret=t / "run"))),
        "checkpoint-2/adapter_model.safetensors is not a readable safetensors file", [t]),
}


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _link(path: Path, target: Path) -> Path:
    os.symlink(target, path)
    return path


def _relink(path: Path, target: Path) -> None:
    path.unlink()
    os.symlink(target, path)


def _call(fn: Callable[..., Any], *args: Any, ret: Any, **kwargs: Any) -> Any:
    fn(*args, **kwargs)
    return ret


def _corrupt_run(source: Path, target: Path) -> None:
    copy(source, target)
    truncate(target / "checkpoint-2" / "adapter_model.safetensors", 40)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_cli_input_gives_one_clear_line_and_touches_nothing(name, env, tmp_path, capfd):
    case = CASES[name](env, tmp_path)
    before = {str(p): snapshot(p) for p in case.watch}
    code, lines, err = run_cli(case.argv, capfd)
    clear = code == 2 and len(lines) == 1 and case.message in lines[0]
    record_case(f"bad input (existing suite): {name.split('_')[0]}", name, outcome="error" if clear else "wrong",
           data_lost={str(p): snapshot(p) for p in case.watch} != before,
           traceback="Traceback" in err or CRASH_MARK in err)
    assert code == 2, (name, err[-2000:])
    assert "Traceback" not in err and CRASH_MARK not in err
    assert len(lines) == 1, (name, err[-2000:])
    assert lines[0].startswith(f"perft {case.argv[0]}: error: "), lines[0]
    assert case.message in lines[0], (name, lines[0])
    assert {str(p): snapshot(p) for p in case.watch} == before, name
    assert not (tmp_path / "remote-code-ran").exists()  # no model code ran unasked
    assert not list(tmp_path.parent.glob("escaped*"))  # nothing written beside the output folder


def test_read_only_output_is_refused_before_anything_is_written(env, tmp_path, capfd):
    out = existing_output(tmp_path)
    for target in (out, out / "sub"):
        with read_only(out):
            before = snapshot(out)
            for argv in (train_argv(env, target), eval_argv(env, target), analyze_argv(env, target)):
                code, lines, err = run_cli(argv, capfd)
                assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
                assert "cannot write to" in lines[0] and str(target) in lines[0], lines[0]
            assert snapshot(out) == before


def test_the_real_command_prints_no_traceback(tmp_path):
    """The same through `python -m perft` in its own process, what a user runs (one case: each costs seconds)."""
    config_path = _write(tmp_path / "c.yaml", f"layers: {DEEP}\n")
    proc = subprocess.run([PYTHON, "-m", "perft", "train", "--config", str(config_path), "--output",
                           str(tmp_path / "out")], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("perft train: error: config file "), lines
    assert "is not a usable YAML config: maximum recursion depth" in lines[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- untrusted files and paths


def test_no_unpickling_or_remote_code_in_the_source():
    """Weights and states are read through safetensors and JSON only (an AST scan of perft/)."""
    import ast

    def dotted(node: ast.AST) -> str:
        if isinstance(node, ast.Attribute):
            return f"{dotted(node.value)}.{node.attr}"
        return node.id if isinstance(node, ast.Name) else "?"

    forbidden = {"torch.load": "torch.load unpickles (unless weights_only=True)", "pickle.load": "pickle",
                 "pickle.loads": "pickle", "joblib.load": "pickle", "dill.load": "pickle", "eval": "eval",
                 "exec": "exec", "yaml.load": "unsafe YAML", "yaml.unsafe_load": "unsafe YAML",
                 "yaml.full_load": "unsafe YAML", "np.load": "numpy may unpickle", "numpy.load": "numpy may unpickle"}
    source = Path(__file__).resolve().parents[2] / "perft"
    found, calls = [], 0
    for path in sorted(source.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            calls += 1
            name = dotted(node.func)
            keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            where = f"{path.relative_to(source.parent)}:{node.lineno}"
            if name in forbidden and not (name == "torch.load" and keywords.get("weights_only") is True):
                found.append(f"{where}: {forbidden[name]}")
            if keywords.get("trust_remote_code") is True:
                found.append(f"{where}: trust_remote_code=True hard-coded")
            if keywords.get("allow_pickle") is True:
                found.append(f"{where}: allow_pickle=True")
    assert calls > 1000  # the scan saw the code
    assert not found, "\n".join(found)


def test_remote_code_never_runs_unless_asked(env, tmp_path, capfd):
    from perft.loading import load_base_model, load_tokenizer
    from perft.model import PerftModel

    marker = tmp_path / "remote-code-ran"
    model = remote_code_model(copy(env.model, tmp_path / "model"), marker)
    runs = [
        ["train", "--model", str(model), "--data", str(env.data), "--output", str(tmp_path / "t"), "--val-set-size",
         "4", "--report-to", "none", "--no-progress"],
        ["eval", "--model", str(model), "--tasks", "colours", "--data-dir", str(env.dataset), "--output",
         str(tmp_path / "e")],
        ["analyze", "--model", str(model), "--data", str(env.data), "--output", str(tmp_path / "a")],
    ]
    for argv in runs:
        code, lines, _ = run_cli(argv, capfd)
        assert code == 2 and len(lines) == 1, lines
        assert "contains custom code" in lines[0] and "--trust-remote-code" in lines[0], lines[0]
    for load in (lambda: load_base_model(str(model)), lambda: PerftModel.from_pretrained(str(model), env.adapter)):
        with pytest.raises(PerftError, match="contains custom code"):
            load()
    load_tokenizer(str(model))  # the tokenizer itself is plain: it loads, and still runs nothing
    assert not marker.exists()
    # Control: asked for, the same folder's code does run (in a child process with its own HF cache).
    script = "import sys; from perft.loading import load_base_model; load_base_model(sys.argv[1], trust_remote_code=True)"
    child_env = {**subprocess_env(), "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "hf-mod")}
    proc = subprocess.run([PYTHON, "-c", script, str(model)], env=child_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.read_text() == "remote code ran"


def test_paths_in_configs_stay_inside_the_output_folder(env, tmp_path, capfd):
    """A run name or task name with '..' writes nothing outside; a checkpoint symlink is never followed."""
    from perft.training import train

    area = tmp_path / "area"
    outside = area / "outside"
    outside.mkdir(parents=True)
    (outside / "keep.txt").write_text("precious")
    fake = outside / "checkpoint-1"  # looks like a checkpoint, lives outside the output folder
    copy(env.run / "checkpoint-2", fake)
    out = area / "out"
    out.mkdir()
    os.symlink(fake, out / "checkpoint-1")
    before = snapshot(outside)
    with one_thread():
        result = train(config({"model": env.model, "data": env.data}, out, max_steps=2, save_steps=1, eval_steps=1,
                              val_set_size=4, save_total_limit=1, run_name="../../escaped",
                              report_to="tensorboard", overwrite_output_dir=True))
    assert result.status == "completed"
    assert snapshot(outside) == before  # neither deleted through the link nor written
    # the folder perft did not write (no marker) was moved aside whole, the link with it: nothing deleted
    assert sorted(p.name for p in area.iterdir()) == ["out", "out.replaced-1", "outside"]
    assert not (out / "checkpoint-1").exists() and (area / "out.replaced-1" / "checkpoint-1").is_symlink()
    assert (out / "logs").is_dir()
    # an evaluation task whose sidecar names it "../escaped_task" (its folder exists, so it would resolve)
    dataset = area / "data" / "sets"
    write_task(dataset, "evil", {"name": "../escaped_task", "answer_type": "choice", "choices": ["red", "blue"]})
    write_task(dataset.parent, "escaped_task", {"answer_type": "choice", "choices": ["red", "blue"]})
    code, lines, _ = run_cli(eval_argv(env, area / "eval" / "out", "--tasks", "evil", "--data-dir", str(dataset)),
                             capfd)
    assert code == 2 and "is not a plain file name" in lines[0]
    assert not list(area.rglob("escaped_task.jsonl")) and not (area / "eval").exists()


# ---------------------------------------------------------------------------- the Python API


def test_python_api_refuses_bad_values_with_perft_errors(env, tmp_path):
    from perft import PerftConfig, PerftModel, get_perft_model
    from perft.analysis.pipeline import AnalysisOptions
    from perft.data.dataset import prepare_data, validate_records
    from perft.evaluation.tasks import task_from_dict
    from perft.loading import load_base_model, load_tokenizer
    from perft.training import TrainingConfig
    from perft.training import checkpoint as ckpt

    with pytest.raises(PerftError, match="format_version must be an integer, got 2.0"):
        PerftConfig(format_version=2.0)
    with pytest.raises(PerftError, match="base_shapes.hidden_size must be an integer, got '32'"):
        PerftConfig(base_shapes={"hidden_size": "32"})
    with pytest.raises(PerftError, match="model_type must be text or null"):
        PerftConfig(model_type=7)
    with pytest.raises(PerftError, match="config must be a PerftConfig, got dict"):
        get_perft_model(load_base_model(str(env.model)), {"rank": 4})
    with pytest.raises(PerftError, match="wandb_project must be text"):
        TrainingConfig.from_dict({"model": "m", "data": "d", "output": "o", "wandb_project": ["x"]}).validate()
    with pytest.raises(PerftError, match="output contains a NUL character"):
        TrainingConfig.from_dict({"model": "m", "data": "d", "output": "o\x00"}).validate()
    with pytest.raises(PerftError, match="'output' is not valid Unicode text"):
        validate_records([{"instruction": "a", "output": "\udc80"}])
    with pytest.raises(PerftError, match="is not a plain file name"):
        task_from_dict({"name": "a/b", "answer_type": "number"})
    with pytest.raises(PerftError, match="--seed must be in"):
        AnalysisOptions(seed=2**32).validate()
    (tmp_path / "trainer_state.json").write_text('{"global_step": 3, "format_version": "x"}')
    with pytest.raises(PerftError, match="is damaged"):
        ckpt.read_state(tmp_path)
    model = PerftModel.from_pretrained(load_base_model(str(env.model)), env.adapter)
    state = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    state[sorted(state)[0]] = state[sorted(state)[0]].to(torch.int8)
    with pytest.raises(PerftError, match="not a floating-point type"):
        model.load_adapter_state_dict(state)
    # a tokenizer without a pad token but with EOS is usable: EOS pads (without both: refused, above)
    no_pad_tokenizer(env.model, tmp_path / "tok", eos=True)
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.pad_token is not None and tok.pad_token_id == tok.eos_token_id
    # a huge field is no error: it is cut at cutoff_len like any long record
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps([{"instruction": "fox " * 50_000, "output": "red " * 50_000}] * 2
                               + json.loads(env.data.read_text())))
    data = prepare_data(huge, load_tokenizer(str(env.model)), cutoff_len=32, val_set_size=0, split_seed=0,
                        train_on_inputs=True)
    assert data.truncated >= 2 and max(data.train["length"]) == 32


# ---------------------------------------------------------------------------- properties (hypothesis)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["auto", "true", "routed", "lora", "1e-4", "linear", "none", "ddp"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                                            inner, max_size=3),
                      max_leaves=6)


def _field_names() -> list[str]:
    import dataclasses

    from perft.training import TrainingConfig

    return [f.name for f in dataclasses.fields(TrainingConfig)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_field_names()) | st.text(max_size=10), VALUES, max_size=8))
def test_training_config_accepts_or_refuses_with_a_perft_error(values):
    from perft.training import TrainingConfig

    try:
        cfg = TrainingConfig.from_dict({"model": "m", "data": "d.json", "output": "o", **values})
        cfg.validate()
        cfg.validate(world_size=2)
    except PerftError as err:
        assert str(err) and "\n" not in str(err)
        return
    if cfg.method == "perft":
        assert cfg.perft_config().rank == cfg.rank
    assert cfg.batch_size >= 1 and cfg.micro_batch_size_for(1) <= cfg.batch_size
    assert isinstance(cfg.lr, float) and cfg.lr > 0 and 0 <= cfg.seed <= 2**32 - 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(_field_names()), VALUES, max_size=6))
def test_yaml_config_files_accept_or_refuse_with_a_perft_error(tmp_path, values):
    from perft.training import TrainingConfig

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
    try:
        TrainingConfig.from_yaml(path, overrides={"model": "m", "data": "d.json", "output": "o"}).validate()
    except PerftError as err:
        assert str(err) and "\n" not in str(err)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["variant", "adapter", "num_experts", "top_k", "rank", "alpha", "dropout",
                                        "activation", "normalize_top_k", "layers", "adapter_dtype", "base_shapes",
                                        "format_version", "model_type", "router_init_std"]) | st.text(max_size=6),
                       VALUES, max_size=6))
def test_adapter_configs_accept_or_refuse_with_a_perft_error(values):
    from perft import PerftConfig

    try:
        cfg = PerftConfig.from_dict(values)
    except PerftError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert cfg.top_k <= cfg.num_experts or cfg.variant != "routed"
    assert cfg.scaling == float(cfg.alpha) / cfg.rank


TEXT = st.text(max_size=20) | st.sampled_from(["\ud800", "a\udfffb", "\x00", " \t", "é" * 30])  # lone surrogates too
RECORD_VALUES = st.one_of(TEXT, st.none(), st.integers(), st.floats(), st.booleans(), st.lists(TEXT, max_size=2))
RECORDS = st.lists(st.one_of(
    st.fixed_dictionaries({"instruction": TEXT, "output": TEXT}, optional={"input": RECORD_VALUES}),
    st.dictionaries(st.sampled_from(["instruction", "input", "output", "answer", "x"]), RECORD_VALUES, max_size=4),
    RECORD_VALUES,
), max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=RECORDS, layout=st.sampled_from(["json", "jsonl", "wrapped"]))
def test_data_files_load_or_are_refused_with_a_perft_error(tmp_path, records, layout):
    from perft.data.dataset import load_records, validate_records

    path = tmp_path / ("d.jsonl" if layout == "jsonl" else "d.json")
    if layout == "jsonl":
        text = "\n".join(json.dumps(r) for r in records)
    else:
        text = json.dumps({"train": records} if layout == "wrapped" else records)
    path.write_text(text, encoding="utf-8")  # json.dumps escapes surrogates as \\udxxx
    try:
        clean = validate_records(load_records(path), source=str(path))
    except PerftError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert len(clean) == len(records) > 0
    for record in clean:
        assert set(record) == {"instruction", "input", "output"} and record["instruction"].strip()
        assert all(isinstance(v, str) and v.encode("utf-8") is not None for v in record.values())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=64) | st.sampled_from([b"[", b"{}", b"[[[]]]", b"\xef\xbb\xbf[]", b"null"]),
       suffix=st.sampled_from([".json", ".jsonl", ".csv"]))
def test_arbitrary_bytes_as_data_are_refused_with_a_perft_error(tmp_path, content, suffix):
    from perft.data.dataset import load_records, validate_records

    path = tmp_path / f"d{suffix}"
    path.write_bytes(content)
    try:
        validate_records(load_records(path), source=str(path))
    except PerftError as err:
        assert str(err)
