"""The `released` prompt style reproduces the released scripts' exact strings, training and
evaluation each as released; the clean style stays the default everywhere."""

from __future__ import annotations

import pytest

from perft.data.prompts import build_prompt, response_of
from perft.errors import PerftError

PAD = " " * 16


def test_released_training_strings():
    text = build_prompt("Say yes.", output="yes", style="released")
    assert text == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "  # noqa: E501\n\n" + PAD + "### Instruction:\n" + PAD + "Say yes.\n" + PAD + "\n" + PAD + "### Response:\n"
        + PAD + "yes")
    with_input = build_prompt("Add.", "1 and 2", "3", style="released")
    assert with_input.endswith(PAD + "### Input:\n" + PAD + "1 and 2\n" + PAD + "\n" + PAD + "### Response:\n" + PAD + "3")
    # the training prompt (for response-only losses) is the prefix of the training text
    assert text.startswith(build_prompt("Say yes.", style="released"))


def test_released_evaluation_strings_differ_from_training():
    assert build_prompt("Say yes.", style="released", for_eval=True) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
        "\n\n" + PAD + "### Instruction:\n" + PAD + "Say yes.\n\n" + PAD + "### Response:\n" + PAD)
    assert build_prompt("Add.", "1 and 2", style="released", for_eval=True) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n" + PAD + "### Instruction:\n" + PAD
        + "Add.\n\n" + PAD + "### Input:\n" + PAD + "1 and 2\n\n" + PAD + "### Response:\n" + PAD)
    assert response_of(build_prompt("Q", style="released", for_eval=True) + " the answer") == "the answer"


def test_clean_is_the_default_and_unknown_styles_are_refused():
    assert build_prompt("Q", output="A") == build_prompt("Q", output="A", style="clean", for_eval=True)
    assert "  " not in build_prompt("Q", "I", "A")
    with pytest.raises(PerftError, match="unknown prompt style 'paper'; choose one of: clean, released"):
        build_prompt("Q", style="paper")
