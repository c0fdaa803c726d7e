"""Training-step benchmark: the frozen-base floor, PEFT's VeRA (and LoRA) and ours, interleaved in one process.

Used by ``benchmarks/bench.py`` (the CLI). Every case (rank x target set) builds the variants from
one randomly initialised OPT- or LLaMA-shaped model (OPT-125m's widths, or SmolLM2-135M's: hidden
576, 9 query / 3 key-value heads, MLP 576<->1536) and times full training steps (forward, backward,
AdamW) round-robin, rotating the order every round, so that all variants see the same machine
load. Ratios are taken per round against the floor measured in that round, then summarised by
their median. Saved-activation bytes are counted exactly with ``saved_tensors_hooks`` (unique
storages, parameters/buffers/cached projection casts excluded).
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

__all__ = ["BenchShape", "TARGET_SETS", "MODEL_TARGETS", "SHAPES", "VARIANTS", "Variant", "build_base",
           "build_variant", "make_step", "saved_activation_bytes", "time_round_robin", "paths_taken"]

TARGET_SETS = {
    "qv": ["q_proj", "v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],  # OPT's six linears
    "all7": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],  # LLaMA's seven
}
#: The target sets each model has.
MODEL_TARGETS = {"opt": ("qv", "all"), "smollm2": ("qv", "all7")}


class Variant(NamedTuple):
    """How a variant is built: library, ``vera_path``, sibling sharing, memory preference, measured choice."""

    lib: Optional[str]
    path: Optional[str] = None
    share: Optional[bool] = None
    memory: Optional[str] = None
    tune: Optional[bool] = None  # auto: measure candidates (True) or take the cost model's choice (False)


VARIANTS = {
    "floor": Variant(None),
    "peft": Variant("peft"),
    "lora8": Variant("lora"),  # PEFT's LoRA, r=8 (alpha 16), on the same targets
    "ours": Variant("ours", "auto", True, "lean", tune=True),  # the default a user gets
    "ours-model": Variant("ours", "auto", True, "lean", tune=False),  # auto without measuring: the cost model
    "ours-speed": Variant("ours", "auto", True, "speed", tune=True),
    "ours-plain": Variant("ours", "plain", False),
    "ours-lean": Variant("ours", "lean", True),
    "ours-lean-noshare": Variant("ours", "lean", False),
    "ours-save_h": Variant("ours", "save_h", True),
    "ours-merged": Variant("ours", "merged", True),
    "ours-merged-noshare": Variant("ours", "merged", False),
}


@dataclass
class BenchShape:
    """Model and batch shape (defaults: OPT-125m, B=4, T=128)."""

    hidden: int = 768
    layers: int = 12
    ffn: int = 3072
    heads: int = 12
    vocab: int = 50272
    batch: int = 4
    seq_len: int = 128
    model: str = "opt"  # "opt" (OPTForCausalLM) or "smollm2" (LlamaForCausalLM)
    kv_heads: Optional[int] = None  # LLaMA: key/value heads (GQA)


#: Full-size shapes per model: OPT-125m; SmolLM2-135M's widths with 4 of its 30 layers (random weights).
SHAPES = {
    "opt": BenchShape(),
    "smollm2": BenchShape(hidden=576, layers=4, ffn=1536, heads=9, kv_heads=3, vocab=49152, batch=3, seq_len=256,
                          model="smollm2"),
}


def build_base(shape: BenchShape, dtype: torch.dtype, device: str, seed: int = 0) -> nn.Module:
    """A randomly initialised ``OPTForCausalLM`` / ``LlamaForCausalLM`` of ``shape`` (dropout off), in train mode."""
    if shape.model == "smollm2":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
            num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads or shape.heads, max_position_embeddings=max(2048, shape.seq_len),
            tie_word_embeddings=True, attention_dropout=0.0,
        )
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).to(dtype=dtype, device=device).train()
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers, ffn_dim=shape.ffn,
        num_attention_heads=shape.heads, word_embed_proj_dim=shape.hidden,
        max_position_embeddings=max(2048, shape.seq_len),
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
    )
    torch.manual_seed(seed)
    model = OPTForCausalLM(cfg).to(dtype=dtype, device=device)
    return model.train()


def _add_gate(model: nn.Module) -> nn.Parameter:
    """One trainable scalar on the embedding output: gradients then flow back through every layer."""
    gate = nn.Parameter(torch.ones((), dtype=model.dtype, device=model.device))
    model.register_parameter("floor_gate", gate)
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out * gate)
    return gate


def build_variant(base: nn.Module, name: str, r: int, targets: list[str], inplace: bool = False) -> nn.Module:
    """``name`` (a key of :data:`VARIANTS`) built on a copy of ``base`` (or on ``base`` itself)."""
    lib, path, share, memory, _ = VARIANTS[name]
    model = base if inplace else copy.deepcopy(base)
    model.requires_grad_(False)
    if lib in ("peft", "lora"):
        import peft

        config = (peft.VeraConfig(r=r, target_modules=targets) if lib == "peft"
                  else peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(model, config)
    elif lib == "ours":
        from vera_lightning import VeraConfig, apply_vera, set_vera_path
        from vera_lightning.app.models.precision import use_base_precision

        apply_vera(model, VeraConfig(r=r, target_modules=targets))
        set_vera_path(model, path, share=share, memory=memory)
        use_base_precision(model)  # a half base: the bf16 training form, as the app runs it
    gate = _add_gate(model.base_model.model if lib in ("peft", "lora") else model)
    gate.requires_grad_(True)
    return model.train()


def paths_taken(step: Callable[[], float]) -> dict[str, int]:
    """Run ``step`` once and count the autograd paths its adapted layers took (``{"merged": 8, ...}``)."""
    from vera_lightning import record_paths

    with record_paths() as seen:
        step()
    counts: dict[str, int] = {}
    for path in seen.values():
        counts[path.value] = counts.get(path.value, 0) + 1
    return counts


def make_step(model: nn.Module, ids: torch.Tensor, tune: Optional[bool] = None) -> Callable[[], float]:
    """A closure running one training step (forward, backward, AdamW); returns its loss.

    ``tune``: run the step with ``auto``'s measured choice on (``True``) or off (``False``); ``None``
    leaves the process setting.
    """
    from vera_lightning import configure_autotune

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        with configure_autotune(enabled=tune):
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
        return loss.item()

    return step


def _storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (s.device.type, s.data_ptr()), s.nbytes()


def saved_activation_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes of unique storages autograd saves for backward in one forward (weights/buffers excluded)."""
    persistent = {_storage_key(t)[0] for t in list(model.parameters()) + list(model.buffers())}
    for module in model.modules():  # our cached casts of the projections are weights too
        for entry in getattr(module, "_cast_cache", {}).values():
            persistent.update(_storage_key(t)[0] for t in entry[1:])
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(t)
        if key not in persistent:
            seen[key] = max(seen.get(key, 0), nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of every fn, called round-robin (order rotated each round)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(warmup + repeats):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            dt = time.perf_counter() - t0
            if rnd >= warmup:
                times[n].append(dt)
    return times


def summarize(times: dict[str, list[float]], ref: str = "floor") -> dict[str, dict[str, float]]:
    """Median, quartiles and the median per-round ratio / overhead against ``ref``."""
    out = {}
    for n, ts in times.items():
        q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
        row = {"median_s": statistics.median(ts), "p25_s": q[0], "p75_s": q[2], "min_s": min(ts)}
        if ref in times:
            ratios = [t / f for t, f in zip(ts, times[ref])]
            row["ratio_to_floor"] = statistics.median(ratios)
            row["overhead_s"] = statistics.median([t - f for t, f in zip(ts, times[ref])])
            row["ratio_spread"] = (statistics.quantiles(ratios, n=4, method="inclusive")[::2] if len(ratios) > 1
                                   else [ratios[0]] * 2)
        out[n] = row
    return out
