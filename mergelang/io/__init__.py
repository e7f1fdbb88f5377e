"""Checkpoint input and output: lazy safetensors and `.bin` readers, hub ids from the local cache, a streaming
sharded writer, atomic output folders."""

from mergelang.io.atomic import atomic_output_dir, free_bytes
from mergelang.io.checkpoint import Checkpoint
from mergelang.io.hf_files import MODEL_FILES, copy_model_files
from mergelang.io.safetensors_format import (
    DTYPE_CODES,
    DTYPES,
    CheckpointError,
    TensorInfo,
    itemsize,
    read_header,
)
from mergelang.io.torch_bin import BinCheckpoint
from mergelang.io.writer import OutputTensor, ShardedWriter, plan_shards, shard_file_names

__all__ = [
    "DTYPES",
    "DTYPE_CODES",
    "MODEL_FILES",
    "BinCheckpoint",
    "Checkpoint",
    "CheckpointError",
    "OutputTensor",
    "ShardedWriter",
    "TensorInfo",
    "atomic_output_dir",
    "copy_model_files",
    "free_bytes",
    "itemsize",
    "plan_shards",
    "read_header",
    "shard_file_names",
]
