"""Training-step benchmark: the frozen-base floor, PEFT's VeRA and ours, interleaved in one process.

Used by ``scripts/bench.py`` (the CLI). Every case (rank x target set) builds the variants from
one randomly initialised OPT-shaped model and times full training steps (forward, backward,
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
from typing import Callable

import torch
from torch import nn

__all__ = ["BenchShape", "TARGET_SETS", "build_base", "build_variant", "saved_activation_bytes", "time_round_robin",
           "paths_taken"]

TARGET_SETS = {
    "qv": ["q_proj", "v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}

#: Variant name -> (library, vera_path, share siblings, memory preference of "auto").
VARIANTS = {
    "floor": (None, None, None, None),
    "peft": ("peft", None, None, None),
    "ours": ("ours", "auto", True, "lean"),
    "ours-speed": ("ours", "auto", True, "speed"),
    "ours-plain": ("ours", "plain", False, None),
    "ours-lean": ("ours", "lean", True, None),
    "ours-lean-noshare": ("ours", "lean", False, None),
    "ours-save_h": ("ours", "save_h", True, None),
    "ours-merged": ("ours", "merged", True, None),
    "ours-merged-noshare": ("ours", "merged", False, None),
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


def build_base(shape: BenchShape, dtype: torch.dtype, device: str, seed: int = 0) -> nn.Module:
    """A randomly initialised ``OPTForCausalLM`` of ``shape`` (dropout off), in train mode."""
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
    lib, path, share, memory = VARIANTS[name]
    model = base if inplace else copy.deepcopy(base)
    model.requires_grad_(False)
    if lib == "peft":
        import peft

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(model, peft.VeraConfig(r=r, target_modules=targets))
    elif lib == "ours":
        from vera_lightning import VeraConfig, apply_vera, set_vera_path

        apply_vera(model, VeraConfig(r=r, target_modules=targets))
        set_vera_path(model, path, share=share, memory=memory)
    gate = _add_gate(model.base_model.model if lib == "peft" else model)
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


def make_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    """A closure running one training step (forward, backward, AdamW); returns its loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
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
