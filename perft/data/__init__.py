"""Instruction data: prompt templates, loading and batching (LLM-Adapters format)."""

from perft.data.collate import PaddingCollator
from perft.data.dataset import load_records, prepare_data, validate_records
from perft.data.prompts import RESPONSE_MARKER, build_prompt

__all__ = ["RESPONSE_MARKER", "PaddingCollator", "build_prompt", "load_records", "prepare_data", "validate_records"]
