"""vera-lightning: VeRA (Vector-based Random Matrix Adaptation) for PyTorch Lightning."""

from vera_lightning.config import VeraConfig
from vera_lightning.core.adapter import DEFAULT_ADAPTER, VeraAdapter
from vera_lightning.core.layer import VeraLinear
from vera_lightning.core.lookup import adapter_root, find_adapter, vera_layers
from vera_lightning.core.qtensor import SCHEMES as QUANTIZE_SCHEMES
from vera_lightning.forward.autotune import autotune_report, configure_autotune
from vera_lightning.forward.dispatch import record_paths
from vera_lightning.forward.precision import PrecisionChoice, bf16_native_cpu, measure_precision
from vera_lightning.forward.protocol import VeraPath
from vera_lightning.io.adapter_dir import load_adapter, save_adapter
from vera_lightning.io.atomic import publish, replace_file, umask_mode
from vera_lightning.io.gguf_lora import (
    GGUF_ARCHITECTURES,
    GgufLoraExport,
    export_gguf_lora,
    gguf_lora_problems,
    is_gguf_lora_file,
)
from vera_lightning.io.locks import locked
from vera_lightning.io.lora_export import LoraExport, export_lora
from vera_lightning.io.peft_format import ADAPTER_CONFIG_NAME
from vera_lightning.io.safetensors_file import write_safetensors
from vera_lightning.ops.batching import adapter_batch
from vera_lightning.ops.grad_checkpointing import enable_gradient_checkpointing
from vera_lightning.ops.inject import apply_vera, count_parameters, mark_trainable, set_vera_path
from vera_lightning.ops.merge import merge_vera, unload_vera, unmerge_vera
from vera_lightning.ops.named import add_adapter, delete_adapter, disable_adapter, set_adapter
from vera_lightning.ops.precision import set_projection_dtype
from vera_lightning.ops.quantize import dequantize_base, is_quantized, model_bytes, quantize_base
from vera_lightning.training.callback import VeraCallback
from vera_lightning.training.slim import checkpoint_config, load_vera_checkpoint

__all__ = [
    "VeraConfig", "apply_vera", "merge_vera", "unmerge_vera", "unload_vera", "VeraLinear", "count_parameters",
    "VeraCallback", "save_adapter", "load_adapter", "set_vera_path", "VeraPath", "record_paths",
    "configure_autotune", "autotune_report", "measure_precision", "PrecisionChoice", "bf16_native_cpu",
    "set_projection_dtype",
    "VeraAdapter", "find_adapter", "vera_layers",
    "DEFAULT_ADAPTER", "add_adapter", "set_adapter", "delete_adapter", "disable_adapter", "adapter_batch",
    "export_lora", "LoraExport", "export_gguf_lora", "GgufLoraExport", "gguf_lora_problems",
    "quantize_base", "dequantize_base", "is_quantized", "model_bytes",
    # what the app (vera_lightning.app) builds on besides the above
    "adapter_root", "mark_trainable", "enable_gradient_checkpointing", "ADAPTER_CONFIG_NAME", "QUANTIZE_SCHEMES",
    "checkpoint_config", "load_vera_checkpoint", "replace_file", "publish", "umask_mode", "GGUF_ARCHITECTURES",
    "is_gguf_lora_file",
    "locked", "write_safetensors",
]
__version__ = "0.1.0"
