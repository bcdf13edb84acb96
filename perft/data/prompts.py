"""The Alpaca-style prompt template of LLM-Adapters, used by the paper for training and evaluation.

Training and evaluation must build prompts with the same function, otherwise the model is
evaluated on a format it never saw.
"""

from __future__ import annotations

RESPONSE_MARKER = "### Response:"

_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n" + RESPONSE_MARKER + "\n"
)
_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n" + RESPONSE_MARKER + "\n"
)


def build_prompt(instruction: str, input: str | None = None, output: str | None = None) -> str:
    """Return the prompt for one record; with `output`, the full training text (prompt + response)."""
    template = _WITH_INPUT if input else _WITHOUT_INPUT
    prompt = template.format(instruction=instruction, input=input or "")
    return prompt + output if output is not None else prompt


def response_of(text: str) -> str:
    """The text after the last response marker (how the paper reads a generation)."""
    return text.rsplit(RESPONSE_MARKER, 1)[-1].strip()
