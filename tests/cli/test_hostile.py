"""Issue 15, "nothing lost, ever": hostile inputs by class, each asserting a one-line error naming the
problem (or a correct acceptance), the exit code, that every pre-existing file is byte-identical
afterwards, and that no case reaches the CLI's last-resort "internal error" line.

Cheap cases fail before any model load and share one tiny model per module. The tally of each case
(see tests/helpers/hostile.py) makes the table of docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from perft.cli import main
from perft.output_dir import LOCK_NAME, MARKER_NAME, OutputLock
from tests.helpers.cli import Env, analyze_argv, eval_argv, make_env, run_cli
from tests.helpers.cli import train_argv as cli_train_argv
from tests.helpers.hostile import CRASH_MARK, byte_snapshot, preserved, record
from tests.helpers.training import PYTHON, config, one_thread, subprocess_env


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    """A finished 2-step run (a checkpoint per step) and a 2-item eval task."""
    return make_env(tmp_path_factory.mktemp("hostile"), n_records=16, max_steps=2, save_steps=1, test_items=2)


def check_refused(klass: str, name: str, argv: list[str], fragment: str, watch: list[Path], capfd: Any) -> None:
    """The command exits 2 with one line `perft <cmd>: error: ...` holding `fragment`; nothing changed."""
    before = {str(p): byte_snapshot(p) for p in watch}
    code, lines, err = run_cli(argv, capfd)
    crashed = CRASH_MARK in err or "Traceback" in err
    lost = not all(preserved(before[str(p)], byte_snapshot(p)) for p in watch)
    clear = code == 2 and len(lines) == 1 and lines[0].startswith(f"perft {argv[0]}: error: ") and fragment in lines[0]
    record(klass, name, outcome="error" if clear else "wrong", data_lost=lost, traceback=crashed)
    assert not crashed, err[-2000:]
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"perft {argv[0]}: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert not lost


def user_folder(tmp: Path, kind: str | None = None, files: dict[str, str] | None = None) -> Path:
    """An existing output folder with the user's own files; marked as perft `kind` output if given."""
    out = tmp / "out"
    out.mkdir()
    for name, text in (files or {"notes.txt": "the user's own file"}).items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    if kind:
        (out / MARKER_NAME).write_text(json.dumps({"kind": kind, "written_by": "perft"}))
    return out


def train_argv(env: Env, out: Path, *extra: str) -> list[str]:
    return cli_train_argv(env, out, *extra, save_steps=1)


def pretrain_argv(env: Env, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--output", str(out), "--steps", "1", "--tokenizer-docs", "50", *extra]


def demo_argv(env: Env, out: Path, *extra: str) -> list[str]:
    return ["demo", "--output", str(out), "--no-progress", *extra]


COMMANDS: dict[str, Callable[..., list[str]]] = {
    "train": train_argv, "eval": eval_argv, "analyze": analyze_argv, "pretrain": pretrain_argv, "demo": demo_argv,
}

# ---------------------------------------------------------------------------- numeric flags

TRAIN_NUMBERS = [
    ("epochs", "1e308", "epochs must be"), ("epochs", "inf", "epochs must be"), ("epochs", "nan", "epochs must be"),
    ("epochs", "0", "epochs must be"), ("epochs", "-1", "epochs must be"), ("epochs", "2e6", "epochs must be"),
    ("lr", "0", "lr must be"), ("lr", "-1", "lr must be"), ("lr", "inf", "lr must be"), ("lr", "nan", "lr must be"),
    ("lr", "100", "lr 100.0 is far outside"),
    ("alpha", "0", "alpha must be"), ("alpha", "-2", "alpha must be"), ("alpha", "inf", "alpha must be"),
    ("alpha", "nan", "alpha must be"),
    ("adam-epsilon", "0", "adam_epsilon must be"), ("adam-epsilon", "-1e-8", "adam_epsilon must be"),
    ("adam-epsilon", "inf", "adam_epsilon must be"), ("adam-epsilon", "nan", "adam_epsilon must be"),
    ("dropout", "1", "dropout must be"), ("dropout", "-0.1", "dropout must be"), ("dropout", "nan", "dropout must be"),
    ("dropout", "1.5", "dropout must be"),
    ("warmup-steps", "-1", "warmup_steps must be"), ("warmup-steps", "99999999999", "warmup_steps must be"),
    ("max-steps", "0", "max_steps must be"), ("max-steps", "-1", "max_steps must be"),
    ("max-steps", "99999999999", "max_steps must be"),
    ("seed", "-1", "seed must be"), ("seed", "4294967296", "seed must be"), ("split-seed", "-1", "split_seed must be"),
    ("weight-decay", "-1", "weight_decay must be"), ("weight-decay", "inf", "weight_decay must be"),
    ("weight-decay", "nan", "weight_decay must be"),
    ("max-grad-norm", "-1", "max_grad_norm must be"), ("max-grad-norm", "nan", "max_grad_norm must be"),
    ("max-grad-norm", "inf", "max_grad_norm must be"),
    ("adam-beta1", "1", "adam_beta1 must be"), ("adam-beta1", "-0.1", "adam_beta1 must be"),
    ("adam-beta1", "nan", "adam_beta1 must be"), ("adam-beta2", "1.5", "adam_beta2 must be"),
    ("adam-beta2", "nan", "adam_beta2 must be"),
    ("router-aux-loss-coef", "-1", "router_aux_loss_coef must be"),
    ("router-aux-loss-coef", "inf", "router_aux_loss_coef must be"),
    ("router-aux-loss-coef", "nan", "router_aux_loss_coef must be"),
    ("cutoff-len", "1", "cutoff_len must be"), ("cutoff-len", "0", "cutoff_len must be"),
    ("batch-size", "0", "batch_size"), ("batch-size", "-4", "batch_size"),
    ("eval-steps", "0", "eval_steps must be"), ("save-steps", "0", "save_steps must be"),
    ("logging-steps", "0", "logging_steps must be"), ("val-set-size", "-1", "val_set_size must be"),
    ("rank", "0", "rank"), ("rank", "-1", "rank"), ("num-experts", "0", "num_experts"), ("top-k", "0", "top_k"),
    ("save-total-limit", "0", "save_total_limit must be"), ("max-train-samples", "0", "max_train_samples must be"),
    ("eval-batch-size", "0", "eval_batch_size must be"),
]


@pytest.mark.parametrize(("flag", "value", "fragment"), TRAIN_NUMBERS,
                         ids=[f"{f}={v}" for f, v, _ in TRAIN_NUMBERS])
def test_train_numeric_flags(env, tmp_path, capfd, flag, value, fragment):
    out = user_folder(tmp_path, "train")
    check_refused("numeric flags: train", f"{flag}={value}", train_argv(env, out, f"--{flag}={value}"), fragment,
                  [out], capfd)
    assert not (tmp_path / "out" / LOCK_NAME).exists()


PRETRAIN_NUMBERS = [
    ("lr", "inf"), ("lr", "nan"), ("lr", "0"), ("lr", "-1"), ("min-lr-ratio", "2"), ("min-lr-ratio", "nan"),
    ("weight-decay", "nan"), ("weight-decay", "-1"), ("grad-clip", "inf"), ("grad-clip", "-1"),
    ("router-aux-loss-coef", "nan"), ("steps", "0"), ("steps", "-1"), ("seed", "-1"), ("warmup-steps", "-1"),
    ("log-every", "0"), ("threads", "0"), ("top-k", "99"), ("eval-docs-per-domain", "0"),
]


@pytest.mark.parametrize(("flag", "value"), PRETRAIN_NUMBERS, ids=[f"{f}={v}" for f, v in PRETRAIN_NUMBERS])
def test_pretrain_numeric_flags(env, tmp_path, capfd, flag, value):
    out = tmp_path / "model"
    check_refused("numeric flags: pretrain", f"{flag}={value}", pretrain_argv(env, out, f"--{flag}={value}"),
                  f"--{flag}", [tmp_path], capfd)
    assert not out.exists()


DEMO_NUMBERS = [("epochs", "0"), ("epochs", "inf"), ("epochs", "nan"), ("epochs", "1e308"), ("lr", "0"),
                ("lr", "inf"), ("lr", "nan"), ("max-steps", "0"), ("threads", "0"), ("seed", "-1"),
                ("max-eval-samples", "0")]


@pytest.mark.parametrize(("flag", "value"), DEMO_NUMBERS, ids=[f"{f}={v}" for f, v in DEMO_NUMBERS])
def test_demo_numeric_flags(env, tmp_path, capfd, flag, value):
    out = tmp_path / "demo"
    check_refused("numeric flags: demo", f"{flag}={value}", demo_argv(env, out, f"--{flag}={value}"), f"--{flag}",
                  [tmp_path], capfd)
    assert not out.exists()


DEVICES = [(cmd, device) for cmd in ("eval", "analyze") for device in ("meta", "cuda:99", "gpu", "cpu x")]


@pytest.mark.parametrize(("command", "device"), DEVICES, ids=[f"{c}-{d}" for c, d in DEVICES])
def test_device_flag(env, tmp_path, capfd, command, device):
    out = tmp_path / "out"
    check_refused("numeric flags: --device", f"{command} {device}", COMMANDS[command](env, out, "--device", device),
                  "--device", [tmp_path], capfd)
    assert not out.exists()


# ---------------------------------------------------------------------------- output folders

@pytest.mark.parametrize("command", list(COMMANDS))
def test_folder_perft_did_not_write_is_refused(env, tmp_path, capfd, command):
    out = user_folder(tmp_path)
    check_refused("output folder policy", f"{command}: unmarked folder", COMMANDS[command](env, out),
                  "--overwrite-output-dir", [out], capfd)
    assert sorted(os.listdir(out)) == ["notes.txt"]  # not even a lock file is left


TRAIN_NAMES = ["metrics.jsonl", "training_config.yaml", ".tmp-checkpoint-3/x", ".trash-old/x"]


@pytest.mark.parametrize("name", TRAIN_NAMES)
def test_train_never_touches_the_users_files_of_its_own_names(env, tmp_path, capfd, name):
    out = user_folder(tmp_path, files={name: "the user's own"})
    check_refused("output folder policy", f"train: user's {name}", train_argv(env, out), "--overwrite-output-dir",
                  [out], capfd)


OTHER_KIND = [("train", "eval"), ("eval", "train"), ("analyze", "train"), ("pretrain", "train"), ("demo", "eval")]


@pytest.mark.parametrize(("command", "kind"), OTHER_KIND, ids=[f"{c}-into-{k}" for c, k in OTHER_KIND])
def test_folder_of_another_kind_is_refused(env, tmp_path, capfd, command, kind):
    out = user_folder(tmp_path, kind)
    check_refused("output folder policy", f"{command} into a {kind} folder", COMMANDS[command](env, out),
                  f"holds a perft {kind} output", [out], capfd)


LINKS = [("train", "metrics.jsonl"), ("eval", "summary.json"), ("analyze", "analysis.json")]


@pytest.mark.parametrize(("command", "name"), LINKS, ids=[c for c, _ in LINKS])
def test_symlink_inside_the_output_is_never_written_through(env, tmp_path, capfd, command, name):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious")
    out = user_folder(tmp_path, command, files={})
    os.symlink(target, out / name)
    check_refused("output folder policy", f"{command}: link {name}", COMMANDS[command](env, out), "symbolic link",
                  [out, target], capfd)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_output_that_is_a_file(env, tmp_path, capfd, command):
    out = tmp_path / "out"
    out.write_text("a file")
    check_refused("output folder policy", f"{command}: output is a file", COMMANDS[command](env, out),
                  "exists and is not a folder", [tmp_path], capfd)


def test_data_file_where_the_run_writes_its_metrics(env, tmp_path, capfd):
    out = user_folder(tmp_path, "train", files={"metrics.jsonl": env.data.read_text()})
    check_refused("output folder policy", "train: --data OUT/metrics.jsonl",
                  train_argv(env, out, "--data", str(out / "metrics.jsonl")), "is a file this command writes",
                  [out], capfd)


def test_resume_with_overwrite_contradicts(env, tmp_path, capfd):
    out = user_folder(tmp_path, "train")
    check_refused("output folder policy", "train: --resume auto with --overwrite-output-dir",
                  train_argv(env, out, "--resume", "auto", "--overwrite-output-dir"), "contradict", [out], capfd)


# ---------------------------------------------------------------------------- locks and concurrency

@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_second_run_on_a_locked_folder_fails_at_once(env, tmp_path, capfd, command):
    kind = command
    out = user_folder(tmp_path, kind, files={})
    with OutputLock(out):  # another holder: flock conflicts between open file descriptions, even in one process
        started = time.perf_counter()
        check_refused("locks and concurrency", f"{command}: folder locked", COMMANDS[command](env, out),
                      "in use by another perft run", [out], capfd)
        assert time.perf_counter() - started < 30


def test_concurrent_train_runs_one_fails_at_once_the_other_completes(env, tmp_path):
    out = tmp_path / "out"
    argv = [PYTHON, "-m", "perft", *train_argv(env, out)[:-1], "--max-steps", "6", "--no-progress"]
    first = subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / LOCK_NAME).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    _, first_err = first.communicate(timeout=300)
    ok = (second.returncode == 2 and "in use by another perft run" in second.stderr and first.returncode == 0)
    record("locks and concurrency", "two concurrent perft train", outcome="error" if ok else "wrong",
           traceback="Traceback" in second.stderr + first_err)
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2 and "in use by another perft run" in second.stderr, second.stderr[-2000:]
    assert len(second.stderr.strip().splitlines()) == 1
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line).get("step") for line in lines].count(0) <= 2  # one run's records, not two


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    code = (f"import sys, time; sys.path.insert(0, {str(Path.cwd())!r}); from perft.output_dir import OutputLock; "
            f"from pathlib import Path; lock = OutputLock(Path({str(out)!r})); print('held', flush=True); "
            "time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    from perft.errors import PerftError

    with pytest.raises(PerftError, match="in use by another perft run"):
        OutputLock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (out / LOCK_NAME).exists()  # the file stays; the kernel dropped the lock with the process
    lock = OutputLock(out)
    lock.release()
    record("locks and concurrency", "SIGKILLed holder, then a new run", outcome="accepted")


# ---------------------------------------------------------------------------- data inputs

@pytest.mark.parametrize("command", ["train", "analyze"])
def test_named_pipe_as_data_does_not_hang(env, tmp_path, capfd, command):
    fifo = tmp_path / "data.json"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    check_refused("data inputs", f"{command}: named pipe as --data", COMMANDS[command](env, out, "--data", str(fifo)),
                  "not a regular file", [tmp_path], capfd)


def test_device_file_as_data(env, tmp_path, capfd):
    check_refused("data inputs", "train: /dev/zero as --data", train_argv(env, tmp_path / "o", "--data", "/dev/zero"),
                  "not a regular file", [tmp_path], capfd)


def test_csv_data_prints_no_progress_bar(env, tmp_path, capfd):
    from perft.data.dataset import load_records

    path = tmp_path / "d.csv"
    path.write_text("instruction,output\n" + "".join(f"q{i},a{i}\n" for i in range(5)))
    capfd.readouterr()
    assert len(load_records(path)) == 5
    _, err = capfd.readouterr()
    record("data inputs", "CSV data with --no-progress", outcome="accepted" if not err.strip() else "wrong")
    assert err.strip() == ""


# ---------------------------------------------------------------------------- the Python API

API = [
    ("PerftConfig", {"alpha": 0}, "alpha must be > 0"), ("PerftConfig", {"alpha": -1.0}, "alpha must be > 0"),
    ("PerftConfig", {"alpha": float("nan")}, "alpha must be"),
    ("PerftConfig", {"router_init_std": float("inf")}, "router_init_std must be a finite"),
    ("PerftConfig", {"router_init_std": float("nan")}, "router_init_std must be"),
    ("PerftConfig", {"router_init_std": 0.0}, "router_init_std must be"),
    ("PerftConfig", {"dropout": 1.0}, "dropout must be"),
    ("TrainingConfig", {"epochs": 1e308}, "epochs must be"), ("TrainingConfig", {"alpha": 0.0}, "alpha must be"),
    ("TrainingConfig", {"adam_epsilon": 0.0}, "adam_epsilon must be"),
    ("TrainingConfig", {"lr": float("inf")}, "lr must be"),
]


@pytest.mark.parametrize(("kind", "values", "fragment"), API, ids=[f"{k}-{next(iter(v))}={next(iter(v.values()))}"
                                                                   for k, v, _ in API])
def test_python_api_values(env, tmp_path, kind, values, fragment):
    from perft import PerftConfig
    from perft.errors import PerftError

    with pytest.raises(PerftError, match=None) as caught:
        if kind == "PerftConfig":
            PerftConfig(**values)
        else:
            cfg = config({"model": env.model, "data": env.data}, tmp_path / "o", **values)
            cfg.validate()
    message = str(caught.value)
    record("Python API values", f"{kind} {values}", outcome="error" if fragment in message else "wrong")
    assert fragment in message and "\n" not in message, message


# ---------------------------------------------------------------------------- accepted correctly

def test_overwrite_moves_a_foreign_folder_aside_and_deletes_nothing(env, tmp_path, capfd):
    out = user_folder(tmp_path, files={"notes.txt": "mine", "metrics.jsonl": "my own metrics"})
    before = byte_snapshot(out)
    code, _, err = run_cli(train_argv(env, out, "--overwrite-output-dir"), capfd)
    moved = tmp_path / "out.replaced-1"
    ok = code == 0 and byte_snapshot(moved) is not None and preserved(before, byte_snapshot(moved))
    record("accepted correctly", "train --overwrite-output-dir on a user's folder", outcome="accepted" if ok else "x",
           data_lost=not preserved(before, byte_snapshot(moved)), traceback="Traceback" in err)
    assert code == 0, err[-2000:]
    assert preserved(before, byte_snapshot(moved))
    assert (out / "adapter").is_dir() and json.loads((out / MARKER_NAME).read_text())["kind"] == "train"
    assert not (out / "notes.txt").exists()


def test_resume_onto_a_moved_identical_model_and_refuse_a_changed_one(env, tmp_path, capfd):
    import shutil

    from safetensors.torch import load_file, save_file

    model = shutil.copytree(env.model, tmp_path / "moved-model")
    run = shutil.copytree(env.run, tmp_path / "run")
    argv = ["train", "--config", str(run / "training_config.yaml"), "--output", str(run), "--model", str(model),
            "--resume", str(run / "checkpoint-1"), "--no-progress"]
    code, _, err = run_cli(argv, capfd)
    record("accepted correctly", "resume onto a moved identical base", outcome="accepted" if code == 0 else "x",
           traceback="Traceback" in err)
    assert code == 0, err[-2000:]
    weights = next(model.glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0  # same shapes, other weights
    save_file(tensors, str(weights))
    run2 = shutil.copytree(env.run, tmp_path / "run2")
    argv = ["train", "--config", str(run2 / "training_config.yaml"), "--output", str(run2), "--model", str(model),
            "--resume", str(run2 / "checkpoint-1"), "--no-progress"]
    check_refused("checkpoint integrity", "resume onto a changed base at a path", argv, "written by another config",
                  [run2, model], capfd)


def test_adapter_warns_for_a_changed_base_not_for_a_moved_one(env, tmp_path, capfd):
    import shutil

    from safetensors.torch import load_file, save_file

    from perft.evaluation.adapter_dirs import warn_if_other_base

    model = shutil.copytree(env.model, tmp_path / "moved")
    capfd.readouterr()
    warn_if_other_base(model, env.run / "adapter", "perft eval")
    quiet = capfd.readouterr().err
    weights = next(model.glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(weights))
    warn_if_other_base(model, env.run / "adapter", "perft eval")
    warned = capfd.readouterr().err
    record("accepted correctly", "adapter on a moved identical base: no warning", outcome="accepted" if not quiet else "x")
    record("checkpoint integrity", "adapter on a changed base: one-line warning",
           outcome="error" if "fingerprint" in warned else "x")
    assert quiet == ""
    assert len(warned.strip().splitlines()) == 1 and f"not on {model}" in warned and "content fingerprint" in warned
    # the adapter recorded this very path, whose weights changed since: named as such, also when loading
    adapter = shutil.copytree(env.run / "adapter", tmp_path / "adapter")
    saved = json.loads((adapter / "adapter_config.json").read_text())
    saved["base_model_name_or_path"] = str(model)
    (adapter / "adapter_config.json").write_text(json.dumps(saved))
    from perft import PerftModel

    capfd.readouterr()
    with one_thread():
        PerftModel.from_pretrained(str(model), adapter)
    loaded = "\n".join(line for line in capfd.readouterr().err.splitlines() if "warning" in line)
    record("checkpoint integrity", "loading an adapter onto its base changed in place: one-line warning",
           outcome="error" if "changed since" in loaded else "x")
    assert len(loaded.strip().splitlines()) == 1 and "whose weights or config have changed since" in loaded, loaded


def test_edited_checkpoint_state_is_refused_by_its_digest(env, tmp_path, capfd):
    import shutil

    run = shutil.copytree(env.run, tmp_path / "run")
    state = run / "checkpoint-1" / "trainer_state.json"
    data = json.loads(state.read_text())
    data["global_step"] = 2  # says another step than its weights: would skip data
    state.write_text(json.dumps(data, indent=1, sort_keys=True))
    argv = ["train", "--config", str(run / "training_config.yaml"), "--output", str(run), "--resume",
            str(run / "checkpoint-1"), "--no-progress"]
    check_refused("checkpoint integrity", "trainer_state.json edited (another step)", argv,
                  "does not match the digest", [run], capfd)


def test_unexpected_exception_is_one_line_and_a_log(monkeypatch, tmp_path, capfd):
    import perft.cli.pretrain as pretrain_cli

    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pretrain_cli, "run", bug)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    capfd.readouterr()
    code = main(["pretrain", "--output", str(tmp_path / "x")])
    err = capfd.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "internal error (ZeroDivisionError: a bug)" in err and "Traceback" not in err
    log = Path(err.strip().rsplit(" ", 1)[-1])
    assert log.parent == tmp_path and "ZeroDivisionError" in log.read_text() and "Traceback" in log.read_text()


# ---------------------------------------------------------------------------- files read back

def _row(index: Any = 0, **extra: Any) -> dict[str, Any]:
    return {"index": index, "prompt": "x", "prediction": "red", "correct": True, **extra}


EVAL_ROWS = {
    "index 1e400": b'{"index": 1e400, "correct": true}\n{"index": 1, "correct": true}\n',
    "index -1": (json.dumps(_row(-1)) + "\n" + json.dumps(_row(1)) + "\n").encode(),
    "index true": (json.dumps(_row(True)) + "\n" + json.dumps(_row(1)) + "\n").encode(),
    "index a string": (json.dumps(_row("0")) + "\n" + json.dumps(_row(1)) + "\n").encode(),
    "no correct key": (json.dumps({"index": 0, "prompt": "x"}) + "\n" + json.dumps(_row(1)) + "\n").encode(),
    "correct is the string false": (json.dumps(_row(0, correct="false")) + "\n" + json.dumps(_row(1)) + "\n").encode(),
    "correct is 1": (json.dumps(_row(0, correct=1)) + "\n" + json.dumps(_row(1)) + "\n").encode(),
    "correct_norm is null": (json.dumps(_row(0, correct_norm=None)) + "\n" + json.dumps(_row(1)) + "\n").encode(),
    "row is a list": b'[0, true]\n' + (json.dumps(_row(1)) + "\n").encode(),
}


@pytest.mark.parametrize("name", list(EVAL_ROWS))
def test_damaged_eval_rows(env, tmp_path, capfd, name):
    out = user_folder(tmp_path, "eval", files={})
    (out / "colours.jsonl").write_bytes(EVAL_ROWS[name])
    fragment = "line 1 is not a result row" if name == "row is a list" else "line 1 is a damaged result row"
    check_refused("files read back", f"eval rows: {name}", eval_argv(env, out), fragment, [out], capfd)


SUMMARIES = {
    "tasks entry is a list": {"tasks": {"boolq": [1]}},
    "accuracy is text": {"tasks": {"boolq": {"accuracy": "high"}}},
    "accuracy is 7": {"tasks": {"boolq": {"accuracy": 7}}},
    "accuracy is true": {"tasks": {"boolq": {"accuracy": True}}},
    "metrics is a number": {"tasks": {"boolq": {"accuracy": 0.5}}, "metrics": 5},
    "protocol is a list": {"tasks": {"boolq": {"accuracy": 0.5}}, "protocol": ["x"]},
    "accuracy 1e400": b'{"tasks": {"boolq": {"accuracy": 1e400}}}',
}


@pytest.mark.parametrize("name", list(SUMMARIES))
def test_damaged_summary_given_to_compare(env, tmp_path, capfd, name):
    body = SUMMARIES[name]
    path = tmp_path / "summary.json"
    path.write_bytes(body if isinstance(body, bytes) else json.dumps(body).encode())
    check_refused("files read back", f"--compare summary: {name}", ["eval", "--compare", str(path)], str(path),
                  [tmp_path], capfd)


def _edit_router(run: Path, change: Callable[[Any], Any]) -> None:
    from safetensors.torch import load_file, save_file

    weights = run / "checkpoint-1" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(k for k in tensors if k.endswith(".router"))[0]
    tensors[key] = change(tensors[key])
    save_file(tensors, str(weights))


ROUTERS = {
    "wrong width": lambda t: t[:, :3].contiguous(),
    "one dimension": lambda t: t[0].contiguous(),
    "NaN": lambda t: t * float("nan"),
    "Inf": lambda t: t + float("inf"),
}


@pytest.mark.parametrize("name", list(ROUTERS))
def test_damaged_routers_given_to_analyze(env, tmp_path, capfd, name):
    import shutil

    run = shutil.copytree(env.run, tmp_path / "run")
    _edit_router(run, ROUTERS[name])
    out = tmp_path / "analysis"
    argv = analyze_argv(env, out, "--adapter", str(env.run / "adapter"), "--checkpoints", str(run))
    fragment = "contains NaN or Inf" if name in ("NaN", "Inf") else "has shape"
    check_refused("files read back", f"analyze --checkpoints: router {name}", argv, fragment, [run], capfd)
    assert not out.exists()


def test_full_disk_while_saving_weights(env, tmp_path, monkeypatch):
    import torch
    from safetensors import SafetensorError

    import perft.io
    from perft.errors import PerftError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(perft.io, "save_file", full)
    (tmp_path / "keep.txt").write_text("mine")
    before = byte_snapshot(tmp_path)
    with pytest.raises(PerftError, match="free some disk space") as caught:
        perft.io.atomic_save_safetensors(tmp_path / "w.safetensors", {"a": torch.zeros(2)})
    record("files read back", "full disk while saving safetensors", outcome="error",
           data_lost=not preserved(before, byte_snapshot(tmp_path)))
    assert "\n" not in str(caught.value) and byte_snapshot(tmp_path) == before  # no temporary left behind


def test_tokenizer_with_more_tokens_than_the_model(env, tmp_path, capfd):
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    model = shutil.copytree(env.model, tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    size = AutoConfig.from_pretrained(str(model)).vocab_size
    words = [f"zq{i}x" for i in range(size + 8 - len(tokenizer))]
    tokenizer.add_tokens(words)
    tokenizer.save_pretrained(str(model))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"what is {w}", "output": w} for w in words[-16:]]))
    out = tmp_path / "out"
    check_refused("data inputs", "tokenizer larger than the model's embedding",
                  train_argv(env, out, "--model", str(model), "--data", str(data)), "tokens", [model, data], capfd)
    assert not out.exists()


EVAL_INPUTS = {
    "lone surrogate in a record": b'[{"instruction": "\\ud800", "answer": "red"}]',
    "answer is a number": b'[{"instruction": "colour?", "answer": 1e400}]',
    "records are not a list": b'{"instruction": "colour?"}',
    "a record is a string": b'["colour?"]',
    "no answer": b'[{"instruction": "colour?"}]',
}


@pytest.mark.parametrize("name", list(EVAL_INPUTS))
def test_damaged_eval_input(env, tmp_path, capfd, name):
    dataset = tmp_path / "sets"
    task = dataset / "mytask"
    task.mkdir(parents=True)
    (task / "test.json").write_bytes(EVAL_INPUTS[name])
    (task / "task.json").write_text(json.dumps({"answer_type": "choice", "choices": ["red", "blue"]}))
    out = tmp_path / "out"
    argv = eval_argv(env, out, "--tasks", "mytask", "--data-dir", str(dataset))
    check_refused("data inputs", f"eval input: {name}", argv, "test.json", [dataset], capfd)
    assert not out.exists()


# ---------------------------------------------------------------------------- numerics that used to pass silently

def test_non_finite_validation_loss_stops_the_run(env, tmp_path, monkeypatch):
    import torch

    from perft.training import train
    from perft.training.state import NonFiniteLoss
    from perft.training.trainer import Trainer

    forward = Trainer._forward

    def nan_when_evaluating(self, batch):
        ce, aux, out = forward(self, batch)
        return (ce * float("nan") if not torch.is_grad_enabled() else ce), aux, out

    monkeypatch.setattr(Trainer, "_forward", nan_when_evaluating)
    out = tmp_path / "out"
    with one_thread(), pytest.raises(NonFiniteLoss, match="validation loss became nan at step 0") as caught:
        train(config({"model": env.model, "data": env.data}, out, max_steps=2, save_steps=1, eval_steps=1,
                     val_set_size=4, load_best_at_end=False))
    record("numerics", "NaN validation loss", outcome="error")
    assert "\n" not in str(caught.value)
    assert not (out / "adapter").exists() and not (out / "train_summary.json").exists()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_weights_are_never_exported(env, tmp_path, value):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from perft.training.run_folder import RunFolder
    from perft.training.state import NonFiniteLoss

    run = shutil.copytree(env.run, tmp_path / "run")
    weights = run / "checkpoint-2" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float(value))
    save_file(tensors, str(weights))
    before = byte_snapshot(run / "adapter")
    with pytest.raises(NonFiniteLoss, match="holds NaN or Inf"):
        RunFolder(run).export_adapter(run / "checkpoint-2", 2)
    record("numerics", f"{value} adapter weights at export", outcome="error",
           data_lost=byte_snapshot(run / "adapter") != before)
    assert byte_snapshot(run / "adapter") == before  # the exported adapter of the good run is untouched


FILE_FOR_FOLDER = {
    "eval --data-dir": lambda e, f: eval_argv(e, f.parent / "o", "--data-dir", str(f)),
    "eval --adapter": lambda e, f: eval_argv(e, f.parent / "o", "--adapter", str(f)),
    "eval --model": lambda e, f: eval_argv(e, f.parent / "o", "--model", str(f)),
    "train --model": lambda e, f: train_argv(e, f.parent / "o", "--model", str(f)),
    "train --resume": lambda e, f: train_argv(e, f.parent / "o", "--resume", str(f)),
    "analyze --checkpoints": lambda e, f: analyze_argv(e, f.parent / "o", "--adapter", str(e.run / "adapter"),
                                                       "--checkpoints", str(f)),
    "analyze --adapter": lambda e, f: analyze_argv(e, f.parent / "o", "--adapter", str(f)),
    "analyze --model": lambda e, f: analyze_argv(e, f.parent / "o", "--model", str(f)),
}


@pytest.mark.parametrize("name", list(FILE_FOR_FOLDER))
def test_a_file_where_a_folder_is_expected(env, tmp_path, capfd, name):
    path = tmp_path / "thing"
    path.write_text("a file, not a folder")
    check_refused("data inputs", f"{name} is a file", FILE_FOR_FOLDER[name](env, path), str(path), [tmp_path], capfd)


def test_overwrite_does_not_write_through_a_link_in_a_perft_folder(env, tmp_path, capfd):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    out = user_folder(tmp_path, "train", files={})
    os.symlink(target, out / "checkpoint-1")
    check_refused("output folder policy", "train --overwrite-output-dir: link inside a perft folder",
                  train_argv(env, out, "--overwrite-output-dir"), "symbolic link", [out, target], capfd)
