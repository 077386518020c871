"""Data layer: readers, row formats, tokenization with loss masks, loaders with the bad-row policy, stats.

Importing it loads no ray, vllm, transformers or torch: tokenizers are passed in, and
``rayapp.data.collate`` imports torch inside its functions.
"""

from rayapp.data.formats import (
    ChatExample,
    DistillInput,
    PreferencePair,
    PromptRecord,
    RowError,
    TeacherInfo,
    TeacherOutput,
    TextExample,
    parse_sft_row,
)
from rayapp.data.loaders import (
    DataError,
    load_distill_inputs,
    load_preference_pairs,
    load_prompts,
    load_records,
    load_teacher_outputs,
    split_indices,
)
from rayapp.data.readers import Row, read_rows, write_jsonl_atomic
from rayapp.data.sft import SFTDataset, load_sft_dataset, load_sft_splits, split_validation
from rayapp.data.stats import DatasetStats
from rayapp.data.tokenize import Encoded, TemplateError, encode_example

__all__ = [
    "ChatExample",
    "DataError",
    "DatasetStats",
    "DistillInput",
    "Encoded",
    "PreferencePair",
    "PromptRecord",
    "Row",
    "RowError",
    "SFTDataset",
    "TeacherInfo",
    "TeacherOutput",
    "TemplateError",
    "TextExample",
    "encode_example",
    "load_distill_inputs",
    "load_preference_pairs",
    "load_prompts",
    "load_records",
    "load_sft_dataset",
    "load_sft_splits",
    "load_teacher_outputs",
    "parse_sft_row",
    "read_rows",
    "split_indices",
    "split_validation",
    "write_jsonl_atomic",
]
