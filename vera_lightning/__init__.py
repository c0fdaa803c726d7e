"""vera-lightning: VeRA (Vector-based Random Matrix Adaptation) for PyTorch Lightning."""

from vera_lightning.adapter import VeraAdapter, find_adapter, vera_layers
from vera_lightning.callback import VeraCallback
from vera_lightning.checkpoint import load_adapter, save_adapter
from vera_lightning.config import VeraConfig
from vera_lightning.inject import apply_vera, count_parameters, merge_vera, unload_vera, unmerge_vera
from vera_lightning.layer import VeraLinear
from vera_lightning.paths import VeraPath, record_paths, set_vera_path
from vera_lightning.quantize import dequantize_base, is_quantized, model_bytes, quantize_base

__all__ = [
    "VeraConfig", "apply_vera", "merge_vera", "unmerge_vera", "unload_vera", "VeraLinear", "count_parameters",
    "VeraCallback", "save_adapter", "load_adapter", "set_vera_path", "VeraPath", "record_paths",
    "VeraAdapter", "find_adapter", "vera_layers",
    "quantize_base", "dequantize_base", "is_quantized", "model_bytes",
]
__version__ = "0.1.0"
