r"""Export a VeRA adapter as a llama.cpp LoRA adapter in GGUF: ``export_gguf_lora(model, path, rank=None)``.

llama.cpp (and Ollama's ``ADAPTER`` line) applies a LoRA adapter given as a GGUF file over a GGUF base. The
file holds, per adapted weight ``W`` of the base, two tensors named after the base tensor, ``<name>.lora_a``
and ``<name>.lora_b``, and llama.cpp adds ``(alpha / rank) · lora_b @ lora_a`` to ``W`` where rank is the
``lora_b``'s column count. The factors are those of :func:`~vera_lightning.export_lora`
(``lora_a = diag(λ_d) A_s``, ``r x in``; ``lora_b = diag(λ_b) B_s``, ``out x r``; ``alpha = r``: the scale is
exactly 1; or the best rank-``k`` factors with their relative error), stored in float32 in PyTorch's
orientation, which GGUF writes with the dimensions reversed (``lora_a``: ``ne = [in, r]``, ``lora_b``:
``ne = [r, out]``, as llama.cpp's loader checks against the base tensor's ``ne = [in, out]``).

Two things differ from the PEFT file, both as llama.cpp's ``convert_lora_to_gguf.py`` does them:

* **names**: ``model.layers.3.self_attn.q_proj`` is ``blk.3.attn_q.weight`` (``gguf``'s tensor name map for
  the architecture);
* **rotary rows**: the LLaMA converter stores ``q_proj``/``k_proj`` with each head's rows reordered
  (the two halves of the rotary pairs interleaved; :func:`llama_rope_permute`), so ``lora_b``'s rows
  (``ΔW``'s rows) get the same reordering; ``k_proj`` uses the key/value head count (GQA).

The header says ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` and
``general.architecture``, which llama.cpp compares with the base's. Only LLaMA-architecture models
(``model_type == "llama"``: LLaMA 2/3, SmolLM2, TinyLlama, ...) are known; other architectures are
refused by name, as are adapters that also train biases or ``modules_to_save`` (a GGUF LoRA holds only
``lora_a``/``lora_b``). The file is written beside its target and renamed into place, with the mode of the
umask (0644 under umask 022).

The ``gguf`` package (the ``llm`` extra) is needed; it is imported when an export runs.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from vera_lightning.config import BiasMode
from vera_lightning.core.lookup import find_adapted
from vera_lightning.io.adapter_dir import PathLike
from vera_lightning.io.atomic import umask_mode
from vera_lightning.io.lora_export import lora_factors

__all__ = ["GgufLoraExport", "GGUF_ARCHITECTURES", "export_gguf_lora", "gguf_lora_problems", "llama_rope_permute",
           "is_gguf_lora_file"]

#: Hugging Face ``config.model_type`` → the ``gguf`` architecture name llama.cpp knows it by.
GGUF_ARCHITECTURES = {"llama": "llama"}


@dataclass(frozen=True)
class GgufLoraExport:
    """What :func:`export_gguf_lora` wrote.

    Attributes:
        path: The GGUF file.
        rank: The LoRA rank written (``r`` for the exact export).
        alpha: ``adapter.lora.alpha`` (equal to ``rank``: llama.cpp's scale ``alpha / rank`` is 1).
        relative_error: ``‖ΔW - ΔW_k‖_F / ‖ΔW‖_F`` over all layers (``0.0`` for the exact export).
        tensors: Each written tensor's GGUF name and PyTorch shape (``lora_a``: ``r x in``, ``lora_b``: ``out x r``).
        tensor_bytes: Bytes of tensor data (float32).
    """

    path: str
    rank: int
    alpha: float
    relative_error: float
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tensor_bytes: int = 0


def llama_rope_permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the rows of a ``q_proj``/``k_proj`` weight (or of its ``lora_b``) as llama.cpp's LLaMA converter does.

    Within each of ``heads`` heads of ``d`` rows, row ``2 j`` of the result is row ``j`` and row ``2 j + 1`` is row
    ``d / 2 + j`` (the rotary pairs of Hugging Face's "rotate half" layout, interleaved as GGML's rope wants them).
    """
    out = rows.shape[0]
    if out % (2 * heads):
        raise ValueError(f"llama_rope_permute: {out} rows do not split into {heads} heads of an even size")
    return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _architecture(model: nn.Module) -> tuple[str, Any]:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__), config


def gguf_lora_problems(model: nn.Module, adapter_name: Optional[str] = None) -> list[str]:
    """Why ``model``'s adapter cannot be written as a GGUF LoRA (empty: it can), checked before any file is touched.

    Names the architecture when llama.cpp's names for it are not known here, trained biases and
    ``modules_to_save`` (a GGUF LoRA carries ``lora_a``/``lora_b`` only), and adapted layers without a
    llama.cpp tensor name.
    """
    found = find_adapted(model)
    if found is None:
        return [f"{type(model).__name__} carries no VeRA adapter"]
    model_type, config = _architecture(model)
    if model_type not in GGUF_ARCHITECTURES:
        archs = getattr(config, "architectures", None) or [type(model).__name__]
        return [f"the base is a {model_type!r} model ({archs[0]}); GGUF LoRA export knows the llama.cpp tensor "
                f"names of {sorted(GGUF_ARCHITECTURES)} models only (LlamaForCausalLM: LLaMA, SmolLM2, TinyLlama)"]
    adapter = found.adapter
    vera = adapter.config_of(adapter.active if adapter_name is None else adapter_name)
    problems = []
    if vera.modules_to_save:
        problems.append(f"the adapter also trains modules_to_save={list(vera.modules_to_save)}, which a GGUF LoRA "
                        "cannot carry")
    if vera.bias != BiasMode.none:
        problems.append(f"the adapter also trains biases (bias={vera.bias.value!r}), which a GGUF LoRA cannot carry")
    try:
        names = _tensor_names(model, [n for n, _ in found.layers])
    except ImportError as err:
        return problems + [str(err)]
    unmapped = [n for n, g in names.items() if g is None]
    if unmapped:
        problems.append(f"the adapted layers {unmapped[:4]} have no llama.cpp tensor name")
    tied = [n for n, g in names.items() if g == "output.weight" and getattr(config, "tie_word_embeddings", False)]
    if tied:
        problems.append(f"{tied[0]} is tied to the input embeddings, which a llama.cpp model stores once")
    return problems


def _gguf() -> Any:
    try:
        import gguf  # optional dependency (the `llm` extra): only exports need it
    except ImportError:
        raise ImportError("writing a GGUF LoRA needs the Python package 'gguf': pip install gguf "
                          "(or pip install 'vera-lightning[llm]')") from None
    return gguf


def is_gguf_lora_file(path: str) -> bool:
    """Whether ``path`` is a GGUF file whose header says it is a LoRA adapter (``general.type = adapter``,
    ``adapter.type = lora``: what :func:`export_gguf_lora` writes). ``False`` for anything that does not parse."""
    try:
        reader = _gguf().GGUFReader(str(path), "r")
        kind, adapter = reader.get_field("general.type"), reader.get_field("adapter.type")
        return kind is not None and adapter is not None and (kind.contents(), adapter.contents()) == ("adapter", "lora")
    except Exception:  # a truncated or foreign file (the reader raises many types), or no gguf package
        return False


def _tensor_names(model: nn.Module, layer_names: list[str]) -> dict[str, Optional[str]]:
    """Each adapted layer's llama.cpp weight name (``None``: the map has none)."""
    gguf = _gguf()
    config = model.config
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == GGUF_ARCHITECTURES[config.model_type])
    mapping = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    return {name: mapping.get_name(name + ".weight", try_suffixes=(".weight",)) for name in layer_names}


def _heads(config: Any, gguf_name: str) -> Optional[int]:
    """The head count whose rotary rows ``gguf_name`` reorders (``None``: not a query/key weight)."""
    kind = gguf_name.split(".")[-2] if gguf_name.count(".") >= 2 else ""
    if kind == "attn_q":
        return int(config.num_attention_heads)
    if kind == "attn_k":
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return None


def export_gguf_lora(
    model: nn.Module, path: PathLike, adapter_name: Optional[str] = None, rank: Optional[int] = None,
) -> GgufLoraExport:
    """Write VeRA adapter ``adapter_name`` of ``model`` to the GGUF file ``path`` as a llama.cpp LoRA adapter.

    Args:
        model: An adapted ``transformers`` LLaMA-architecture model (``config.model_type == "llama"``).
        path: The ``.gguf`` file to write (replaced if it exists: the caller decides whether it may be).
        adapter_name: Which named adapter (default: the active one).
        rank: ``None``: the exact export at rank ``r``; ``k`` (``1 <= k <= r``): the best rank-``k`` factors.

    Returns:
        A :class:`GgufLoraExport` (path, rank, alpha, relative error, tensor names and shapes).

    Raises:
        ValueError: From :func:`gguf_lora_problems` (architecture, biases, ``modules_to_save``), for a bad
            ``rank`` or non-finite λ's; nothing is written then.
        ImportError: If the ``gguf`` package is not installed.

    Example::

        >>> import tempfile
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from vera_lightning import VeraConfig, apply_vera
        >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
        ...                                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=48))
        >>> model = apply_vera(base, VeraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        >>> export_gguf_lora(model, tempfile.mkdtemp() + "/adapter.gguf").rank
        4
    """
    problems = gguf_lora_problems(model, adapter_name)
    if problems:
        raise ValueError("export_gguf_lora: " + "; ".join(problems))
    gguf = _gguf()
    found = find_adapted(model)
    adapter = found.adapter
    name = adapter.active if adapter_name is None else adapter_name
    config = adapter.config_of(name)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= config.r):
        raise ValueError(f"export_gguf_lora: rank={rank!r} must be an integer with 1 <= rank <= r={config.r} (or None "
                         "for the exact export at rank r)")
    attrs = adapter.lambda_names(name)
    layers = found.layers
    bad = [n for n, layer in layers if not all(torch.isfinite(getattr(layer, a)).all() for a in attrs)]
    if bad:
        raise ValueError(f"export_gguf_lora: adapter {name!r} has NaN/inf λ's in {bad[:4]}; nothing was written")
    names = _tensor_names(model, [n for n, _ in layers])
    written = config.r if rank is None else rank
    tensors: dict[str, torch.Tensor] = {}
    tail_sum = total_sum = 0.0
    with torch.no_grad():
        for layer_name, layer in layers:
            lam_b, lam_d = (getattr(layer, a) for a in attrs)
            a_s, b_s = layer.adapter.sliced(layer.in_features, layer.out_features, lam_d.dtype, lam_d.device)
            lora_a, lora_b, tail, total = lora_factors(lam_b, lam_d, a_s, b_s, rank)
            tail_sum, total_sum = tail_sum + tail, total_sum + total
            target = names[layer_name]
            heads = _heads(model.config, target)
            if heads is not None:
                lora_b = llama_rope_permute(lora_b, heads)
            tensors[target + ".lora_a"] = lora_a.to("cpu", torch.float32).contiguous()
            tensors[target + ".lora_b"] = lora_b.to("cpu", torch.float32).contiguous()
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=directory)
    os.fchmod(handle, umask_mode())  # the writer reopens it: the published file keeps this mode, not mkstemp's 0600
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(staging, GGUF_ARCHITECTURES[model.config.model_type])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(written))
        writer.add_name(f"VeRA adapter {name!r} as LoRA (rank {written})")
        for key, tensor in tensors.items():
            writer.add_tensor(key, tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise
    return GgufLoraExport(
        path=path, rank=written, alpha=float(written),
        relative_error=(tail_sum / total_sum) ** 0.5 if total_sum > 0 else 0.0,
        tensors={k: tuple(t.shape) for k, t in tensors.items()},
        tensor_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
    )
