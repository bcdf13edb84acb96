"""Instruction data: prompt templates, loading and batching (LLM-Adapters format)."""

from perft.data.prompts import RESPONSE_MARKER, build_prompt

__all__ = ["RESPONSE_MARKER", "build_prompt"]
