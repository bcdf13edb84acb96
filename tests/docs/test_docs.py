"""Every code block of README.md and docs/*.md is run here, so the docs cannot drift from the code.

Convention: each fenced block carries a marker, an HTML comment on the line just before the
fence (GitHub does not render it):

    <!-- doc-test: run -->                    run exactly as written
    <!-- doc-test: tiny -->                   run with TINY_RULES applied: hub models and model
                                              paths -> the embedded tiny OLMoE, the paper's data
                                              and benchmarks -> the shipped tiny suites, and small
                                              budgets (--max-steps, --max-samples, ...) appended
    <!-- doc-test: skip reason="needs a GPU" -->   not run; the reason is listed in the counts

An unmarked block fails `test_every_block_is_marked`. bash/sh blocks run through the real CLI
(`bash -eo pipefail`, the repository's `perft` first on PATH); python blocks are exec'd; json
blocks are parsed. The blocks of one document run in order in one scratch folder (with
`configs/` linked in) and one Python namespace, so an `eval` block can use the run a `train`
block above it wrote. Adding a doc block: mark it `run` if it runs in seconds on a CPU, `tiny` if
it names hub models/data (extend TINY_RULES if it needs a new substitution), else `skip` with
the reason. `python tests/docs/test_docs.py` prints the counts (run / substituted / skipped).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHIPPED = REPO / "perft" / "assets"
TINY_MODEL = SHIPPED / "tiny-olmoe"
TASKS = SHIPPED / "tasks" / "dataset"

MARKER = re.compile(r'^\s*<!--\s*doc-test:\s*(run|tiny|skip)(?:\s+reason="([^"]*)")?\s*-->\s*$')
FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)\s*$")

# Budgets appended to every CLI command of a `tiny` block (argparse: the last flag wins).
CLI_BUDGETS = {
    "train": " --max-steps 2 --max-train-samples 48 --val-set-size 8 --batch-size 8 --eval-steps 2 "
             "--save-steps 2 --cutoff-len 96 --no-progress --report-to none",
    "eval": " --max-samples 6 --no-progress",
    "analyze": " --max-samples 6 --projection pca --no-progress",
}
# Extra settings of `perft train --config <paper preset>`, whose model and data are the hub's.
PRESET_INPUTS = f" --model {TINY_MODEL} --data {TASKS}/tiny_commonsense/train.json --model-dtype float32"
TINY_OVERRIDES = {"model": str(TINY_MODEL), "data": str(TASKS / "tiny_math" / "train.json"), "max_steps": 2,
                  "max_train_samples": 48, "val_set_size": 8, "batch_size": 8, "cutoff_len": 96,
                  "model_dtype": "float32", "progress": False, "report_to": "none"}

# (pattern, replacement) applied in order to the text of a `tiny` block.
TINY_RULES: list[tuple[str, str]] = [
    (r"allenai/OLMoE-1B-7B-0924|path/to/OLMoE-1B-7B", str(TINY_MODEL)),
    (r"[\w./-]*commonsense_170k\.json", str(TASKS / "tiny_commonsense" / "train.json")),
    (r"[\w./-]*math_50k\.json", str(TASKS / "tiny_math" / "train.json")),
    (r"--tasks boolq\S*", "--tasks tiny_commonsense"),
    (r"--tasks gsm8k\S*", "--tasks tiny_math"),
    (r"--data-dir \S+", f"--data-dir {TASKS}"),
    (r"dataset/commonsense_test\.json", str(TASKS / "tiny_commonsense" / "test.json")),
    (r" --split-by task", ""),  # the shipped test files have no `task` field
    (r'prepare_tasks\(\["boolq", "piqa"\], "dataset/"\)', f'prepare_tasks(["tiny_commonsense"], "{TASKS}", max_samples=6)'),
    (r'overrides=\{"output": "runs/x"\}', f'overrides={{"output": "runs/x", **{TINY_OVERRIDES!r}}}'),
    (r'TrainingArguments\(output_dir="runs/hf",', 'TrainingArguments(output_dir="runs/hf", max_steps=2, report_to="none",'),
    (r'SFTConfig\(output_dir="runs/sft",', 'SFTConfig(output_dir="runs/sft", max_steps=2, report_to="none",'),
    (r"(?m)(^\s*(?:torchrun .*?-m )?perft (train|eval|analyze)\b(?:(?!  #).)*?)(\s+#.*)?$", None),  # budgets
]


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    mode: str | None  # run / tiny / skip, None when unmarked
    reason: str | None

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def blocks_of(doc: Path) -> list[Block]:
    lines = doc.read_text(encoding="utf-8").split("\n")
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, ticks, lang = opening.groups()
        end = i + 1
        while end < len(lines) and not re.match(rf"^\s*{ticks}\s*$", lines[end]):
            end += 1
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:end]]
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(previous)
        found.append(Block(doc, i + 1, lang.lower(), "\n".join(body) + "\n",
                           marker.group(1) if marker else None, marker.group(2) if marker else None))
        i = end + 1
    return found


def tiny(text: str) -> str:
    """The block with TINY_RULES applied (line continuations joined first)."""
    text = text.replace("\\\n", " ")
    for pattern, replacement in TINY_RULES:
        if replacement is not None:
            text = re.sub(pattern, lambda _m, r=replacement: r, text)
            continue

        def budget(match: re.Match[str]) -> str:
            command, kind, comment = match.group(1), match.group(2), match.group(3) or ""
            extra = CLI_BUDGETS[kind] + (PRESET_INPUTS if kind == "train" and "--config" in command else "")
            return command.rstrip() + extra + comment

        text = re.sub(pattern, budget, text)
    return text


def _run_bash(block: Block, text: str, scratch: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(["bash", "-eo", "pipefail", "-c", text], cwd=scratch, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{block.where} failed (exit {done.returncode}):\n{text}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _run_python(block: Block, text: str, namespace: dict) -> None:
    exec(compile(text, block.where, "exec"), namespace)  # noqa: S102 - the docs' own snippets


def run_block(block: Block, scratch: Path, namespace: dict) -> None:
    text = tiny(block.text) if block.mode == "tiny" else block.text
    if block.lang in ("bash", "sh", "shell", "console"):
        _run_bash(block, text, scratch)
    elif block.lang == "python":
        _run_python(block, text, namespace)
    elif block.lang == "json":
        json.loads(text)
    else:
        raise AssertionError(f"{block.where}: cannot run a block of language {block.lang or '(none)'!r}; "
                             'mark it <!-- doc-test: skip reason="..." -->')


def counts() -> tuple[Counter, list[str]]:
    tally: Counter = Counter()
    skipped: list[str] = []
    for doc in DOCS:
        for block in blocks_of(doc):
            tally[block.mode or "unmarked"] += 1
            if block.mode == "skip":
                skipped.append(f"{block.where}: {block.reason}")
    return tally, skipped


def describe_counts() -> str:
    tally, skipped = counts()
    lines = [f"doc blocks: {tally['run']} run as written, {tally['tiny']} run with the tiny model/data substituted, "
             f"{tally['skip']} skipped, {tally['unmarked']} unmarked"]
    lines += [f"  skipped {entry}" for entry in skipped]
    return "\n".join(lines)


def test_every_block_is_marked():
    print("\n" + describe_counts())
    problems = []
    for doc in DOCS:
        for block in blocks_of(doc):
            if block.mode is None:
                problems.append(f"{block.where}: no <!-- doc-test: run|tiny|skip reason=\"...\" --> before the fence")
            elif block.mode == "skip" and not (block.reason or "").strip():
                problems.append(f"{block.where}: a skipped block needs reason=\"...\"")
    assert not problems, "\n".join(problems)


def test_tiny_rules_rewrite_a_cli_command():
    text = tiny("perft eval --model path/to/OLMoE-1B-7B --adapter runs/r \\\n"
                "           --tasks boolq,piqa --data-dir dataset/   # the paper's\n")
    assert text == (f"perft eval --model {TINY_MODEL} --adapter runs/r             --tasks tiny_commonsense "
                    f"--data-dir {TASKS}{CLI_BUDGETS['eval']}   # the paper's\n")


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_doc_blocks_run(doc, tmp_path, monkeypatch):
    blocks = [b for b in blocks_of(doc) if b.mode in ("run", "tiny")]
    if not blocks:
        pytest.skip(f"{doc.name}: no runnable block")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "tests").symlink_to(REPO / "tests")  # e.g. the published configs perft plan reads in README
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    namespace: dict = {"__name__": "__doc_test__"}
    for block in blocks:
        started = time.perf_counter()
        run_block(block, tmp_path, namespace)
        print(f"{block.where} ({block.mode}): {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    print(describe_counts())
