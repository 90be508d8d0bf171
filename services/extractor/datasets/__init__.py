"""Trait datasets: typed models, readers for the published formats, built-ins and contrast sets."""

from __future__ import annotations

from services.extractor.datasets.contrast import (
    LogitDiffItem,
    build_contrast_set,
    check_methodology,
    logit_diff_items,
)
from services.extractor.datasets.readers import (
    TraitExtras,
    generic_rubric,
    question_stem,
    read_arditi,
    read_caa,
    read_extras,
    read_pv,
)
from services.extractor.datasets.registry import (
    BUILTIN_TRAITS,
    benchmark_file,
    builtin_dir,
    data_dir,
    load_trait,
    published_dir,
)
from services.extractor.datasets.schema import (
    DEFAULT_POSITIONS,
    METHODOLOGIES,
    ABItem,
    ChatMessage,
    ContrastExample,
    Exemplars,
    InstructionPair,
    Methodology,
    SplitItem,
    TraitDataset,
    TraitSplit,
    TraitSplits,
    is_valid_position,
    parse_answer_letter,
)

__all__ = [
    "BUILTIN_TRAITS",
    "DEFAULT_POSITIONS",
    "METHODOLOGIES",
    "ABItem",
    "ChatMessage",
    "ContrastExample",
    "Exemplars",
    "InstructionPair",
    "LogitDiffItem",
    "Methodology",
    "SplitItem",
    "TraitDataset",
    "TraitExtras",
    "TraitSplit",
    "TraitSplits",
    "benchmark_file",
    "build_contrast_set",
    "builtin_dir",
    "check_methodology",
    "data_dir",
    "generic_rubric",
    "is_valid_position",
    "load_trait",
    "logit_diff_items",
    "parse_answer_letter",
    "published_dir",
    "question_stem",
    "read_arditi",
    "read_caa",
    "read_extras",
    "read_pv",
]
