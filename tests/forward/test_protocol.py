"""vera_lightning/forward/protocol.py: the path names, the half dtypes, and what a path may read of a layer."""

from __future__ import annotations

import typing

import torch
from torch import nn

from vera_lightning import VeraConfig, apply_vera
from vera_lightning.forward.protocol import HALF_DTYPES, AdaptedLayer, VeraPath


def test_paths_compare_equal_to_their_names_and_print_as_them():
    assert VeraPath("lean") is VeraPath.lean and VeraPath.lean == "lean" and str(VeraPath.save_h) == "save_h"
    assert {p.value for p in VeraPath} == {"auto", "plain", "lean", "save_h", "merged", "nograd", "mixed", "off"}
    assert HALF_DTYPES == (torch.float16, torch.bfloat16) and torch.float32 not in HALF_DTYPES


def test_an_injected_layer_has_everything_the_protocol_lists():
    model = nn.Sequential(nn.Linear(8, 8))
    apply_vera(model, VeraConfig(r=4, target_modules=["0"]))
    layer = model[0]
    hints = typing.get_type_hints(AdaptedLayer)
    members = set(hints) | {n for n, v in vars(AdaptedLayer).items() if not n.startswith("_") and callable(v)
                            or isinstance(v, property)}
    missing = sorted(n for n in members if not hasattr(layer, n))
    assert missing == []
    assert isinstance(layer.vera_path, VeraPath) and (layer.in_features, layer.out_features, layer.r) == (8, 8, 4)
