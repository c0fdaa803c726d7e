"""vera-lightning: VeRA (Vector-based Random Matrix Adaptation) for PyTorch Lightning."""

from vera_lightning.adapter import DEFAULT_ADAPTER, VeraAdapter, find_adapter, vera_layers
from vera_lightning.batching import adapter_batch
from vera_lightning.callback import VeraCallback
from vera_lightning.checkpoint import load_adapter, save_adapter
from vera_lightning.config import VeraConfig
from vera_lightning.inject import apply_vera, count_parameters, merge_vera, unload_vera, unmerge_vera
from vera_lightning.layer import VeraLinear
from vera_lightning.lora_export import LoraExport, export_lora
from vera_lightning.named import add_adapter, delete_adapter, disable_adapter, set_adapter
from vera_lightning.paths import VeraPath, record_paths, set_vera_path
from vera_lightning.quantize import dequantize_base, is_quantized, model_bytes, quantize_base

__all__ = [
    "VeraConfig", "apply_vera", "merge_vera", "unmerge_vera", "unload_vera", "VeraLinear", "count_parameters",
    "VeraCallback", "save_adapter", "load_adapter", "set_vera_path", "VeraPath", "record_paths",
    "VeraAdapter", "find_adapter", "vera_layers",
    "DEFAULT_ADAPTER", "add_adapter", "set_adapter", "delete_adapter", "disable_adapter", "adapter_batch",
    "export_lora", "LoraExport", "quantize_base", "dequantize_base", "is_quantized", "model_bytes",
]
__version__ = "0.1.0"
