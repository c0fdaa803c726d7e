"""vera-lightning: VeRA (Vector-based Random Matrix Adaptation) for PyTorch Lightning."""

from vera_lightning.core.adapter import DEFAULT_ADAPTER, VeraAdapter
from vera_lightning.core.lookup import find_adapter, vera_layers
from vera_lightning.ops.batching import adapter_batch
from vera_lightning.training.callback import VeraCallback
from vera_lightning.io.adapter_dir import load_adapter, save_adapter
from vera_lightning.config import VeraConfig
from vera_lightning.ops.inject import apply_vera, count_parameters, merge_vera, unload_vera, unmerge_vera
from vera_lightning.core.layer import VeraLinear
from vera_lightning.io.lora_export import LoraExport, export_lora
from vera_lightning.ops.named import add_adapter, delete_adapter, disable_adapter, set_adapter
from vera_lightning.forward.dispatch import record_paths
from vera_lightning.forward.protocol import VeraPath
from vera_lightning.ops.inject import set_vera_path
from vera_lightning.ops.quantize import dequantize_base, is_quantized, model_bytes, quantize_base

__all__ = [
    "VeraConfig", "apply_vera", "merge_vera", "unmerge_vera", "unload_vera", "VeraLinear", "count_parameters",
    "VeraCallback", "save_adapter", "load_adapter", "set_vera_path", "VeraPath", "record_paths",
    "VeraAdapter", "find_adapter", "vera_layers",
    "DEFAULT_ADAPTER", "add_adapter", "set_adapter", "delete_adapter", "disable_adapter", "adapter_batch",
    "export_lora", "LoraExport", "quantize_base", "dequantize_base", "is_quantized", "model_bytes",
]
__version__ = "0.1.0"
