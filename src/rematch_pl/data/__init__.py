"""Data: MMEB readers, the synthetic dataset, the training stream, collators, the datamodule."""

from rematch_pl.data.collate import EvalCollator, TrainCollator, pad_ids
from rematch_pl.data.datamodule import EvalItems, MMEBDataModule
from rematch_pl.data.images import load_image, make_processor_safe
from rematch_pl.data.mmeb import (
    DEFAULT_TARGET_INSTRUCTIONS,
    EVAL_COLUMNS,
    TRAIN_COLUMNS,
    DataError,
    EvalSet,
    HardNegativeIndex,
    apply_target_instruction,
    iter_rows,
    list_subsets,
    load_eval_subset,
    parse_str_list,
    select_negatives,
    stream_subset,
)
from rematch_pl.data.stream import ExampleBatch, TrainStream
from rematch_pl.data.synthetic import generate_synthetic, synthetic_paths

__all__ = [
    "DEFAULT_TARGET_INSTRUCTIONS", "EVAL_COLUMNS", "TRAIN_COLUMNS", "DataError", "EvalCollator", "EvalItems",
    "EvalSet", "ExampleBatch", "HardNegativeIndex", "MMEBDataModule", "TrainCollator", "TrainStream",
    "apply_target_instruction", "generate_synthetic", "iter_rows", "list_subsets", "load_eval_subset",
    "load_image", "make_processor_safe", "pad_ids", "parse_str_list", "select_negatives", "stream_subset",
    "synthetic_paths",
]
