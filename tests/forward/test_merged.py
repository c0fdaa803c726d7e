"""The merged-weight path (vera_lightning/merged.py), and every path, against PEFT's VeRA."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers.models import TINY_MODELS
from helpers.peft_oracle import peft_layer, peft_vera, randomize_lambdas_
from torch import nn

from vera_lightning import VeraConfig, apply_vera, record_paths, set_vera_path
from vera_lightning.core.lookup import vera_layers

pytestmark = pytest.mark.numerics

CASES = [("opt", ["q_proj", "k_proj", "v_proj", "fc1", "fc2"]), ("gpt2", ["c_attn", "c_proj", "c_fc"]),
         ("llama", None), ("bert", None), ("mlp", None)]
PATHS = ["plain", "lean", "save_h", "merged", "auto"]


def _adapted(kind, dtype=torch.float32, targets=None):
    torch.manual_seed(0)
    base = TINY_MODELS[kind][0]().to(dtype).train()
    other = copy.deepcopy(base)
    fields = {"r": 16, "target_modules": targets or TINY_MODELS[kind][1]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = apply_vera(base, VeraConfig(**fields))
    theirs = peft_vera(other, **fields)
    randomize_lambdas_(ours, theirs)
    return ours, theirs


def _embeds(model, kind, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(3, 12, generator=g).to(dtype)
    ids = torch.randint(0, 96, (2, 7), generator=g)
    return model.get_input_embeddings()(ids).detach().to(dtype)


def _run(model, kind, emb, named):
    """Output, λ-gradients and input gradient of one forward/backward."""
    emb = emb.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(emb) if kind == "mlp" else model(inputs_embeds=emb).logits
    (out.float().square().mean() + out.float().mean()).backward()
    grads = {f"{n}.{p}": getattr(l, p).grad.clone() for n, l in named for p in ("vera_lambda_b", "vera_lambda_d")}
    return out.detach(), grads, emb.grad.clone()


def _ours(model):
    return list(vera_layers(model))


def _peft(theirs, names):
    class _View:  # PEFT keeps the λ's in per-adapter dicts
        def __init__(self, layer):
            self.vera_lambda_b, self.vera_lambda_d = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]

    return [(n, _View(peft_layer(theirs, n))) for n in names]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("kind,targets", CASES)
@pytest.mark.parametrize("path", PATHS)
def test_every_path_matches_peft_float32(kind, targets, path):
    ours, theirs = _adapted(kind, targets=targets)
    set_vera_path(ours, path)
    names = [n for n, _ in vera_layers(ours)]
    emb = _embeds(ours, kind, torch.float32)
    out_t, g_t, gx_t = _run(theirs, kind, emb, _peft(theirs, names))
    for step in range(2):  # the second step runs merged siblings as one node
        with record_paths() as seen:
            out, g, gx = _run(ours, kind, emb, _ours(ours))
        assert _rel(out, out_t) <= 1e-5 and _rel(gx, gx_t) <= 1e-5, (step, _rel(out, out_t), _rel(gx, gx_t))
        for name in g:
            assert _rel(g[name], g_t[name]) <= 1e-5, (step, name, _rel(g[name], g_t[name]))
    taken = {p.value for p in seen.values()}
    assert taken == ({path} if path != "auto" else taken & {"lean", "save_h", "merged", "plain"}) and taken


def _half_case(kind, dtype, path):
    ours, theirs = _adapted(kind, dtype=dtype)
    reference = set_vera_path(copy.deepcopy(ours).float(), "plain", share=False)  # same values, float32 math
    set_vera_path(ours, path)
    names = [n for n, _ in vera_layers(ours)]
    emb = _embeds(ours, kind, dtype)
    ref = _run(reference, kind, emb.float(), _ours(reference))
    peft_run = _run(theirs, kind, emb, _peft(theirs, names))
    return ours, names, emb, ref, peft_run


def assert_no_worse_than_peft(ours, theirs, reference, what, margin=1e-3):
    """Ours' error against the float32 reference is at most PEFT's (x1.5) plus a margin."""
    ours_err, peft_err = _rel(ours, reference), _rel(theirs, reference)
    assert ours_err <= 1.5 * peft_err + margin, f"{what}: ours {ours_err:.2e} vs PEFT {peft_err:.2e} from float32"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merged_half_precision_no_worse_than_peft(kind, dtype):
    ours, names, emb, (out_r, g_r, gx_r), (out_t, g_t, gx_t) = _half_case(kind, dtype, "merged")
    for step in range(2):
        with record_paths() as seen:
            out, g, gx = _run(ours, kind, emb, _ours(ours))
        assert out.dtype == dtype and gx.dtype == dtype
        assert_no_worse_than_peft(out, out_t, out_r, f"step {step} output")
        assert_no_worse_than_peft(gx, gx_t, gx_r, f"step {step} grad x")
        for name in g:
            assert g[name].dtype == torch.float32
            assert_no_worse_than_peft(g[name], g_t[name], g_r[name], f"step {step} {name}")
    assert set(seen.values()) == {"merged"} and len(seen) == len(names)


def test_merged_under_autocast_no_worse_than_plain():
    ours, _ = _adapted("llama")
    plain = set_vera_path(copy.deepcopy(ours), "plain", share=False)
    reference = copy.deepcopy(plain)
    set_vera_path(ours, "merged")
    emb = _embeds(ours, "llama", torch.float32)
    ref = _run(reference, "llama", emb, _ours(reference))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = _run(plain, "llama", emb, _ours(plain))
        for _ in range(2):
            got = _run(ours, "llama", emb, _ours(ours))
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    assert_no_worse_than_peft(got[0], base[0], ref[0], "output")
    assert_no_worse_than_peft(got[2], base[2], ref[2], "grad x")
    for name in got[1]:
        assert_no_worse_than_peft(got[1][name], base[1][name], ref[1][name], name)


class Fan(nn.Module):
    """a, b, c read x; ``use`` picks which of them run, so sibling groups can change between steps."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 6), nn.Linear(12, 9, bias=False), nn.Linear(12, 5)
        self.use = ("a", "b", "c")

    def forward(self, x):
        return sum(getattr(self, n)(x).square().mean() * (i + 1) for i, n in enumerate(self.use))


def _fan_pair(train_base=False):
    torch.manual_seed(0)
    ours = apply_vera(Fan(), VeraConfig(r=8, target_modules=["a", "b", "c"], init_weights=False))
    if train_base:
        for layer in (ours.a, ours.b, ours.c):
            layer.weight.requires_grad_(True)
        ours.a.bias.requires_grad_(True)
    plain = set_vera_path(copy.deepcopy(ours), "plain")
    return set_vera_path(ours, "merged"), plain


def _fan_step(model, x):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    model(x).backward()
    return x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("uses", [
    [("a", "b", "c"), ("a", "b", "c"), ("a", "c"), ("a", "b", "c")],  # a planned sibling goes missing
    [("a",), ("a", "b"), ("a", "b", "c"), ("c", "a")],  # unexpected siblings, another leader
])
def test_changing_sibling_groups_keep_values(uses):
    ours, plain = _fan_pair()
    x = torch.randn(4, 3, 12)
    for use in uses:
        ours.use = plain.use = use
        with record_paths() as seen:
            gx, grads = _fan_step(ours, x)
        gx_p, grads_p = _fan_step(plain, x)
        torch.testing.assert_close(gx, gx_p, rtol=1e-5, atol=1e-7)
        assert grads.keys() == grads_p.keys()
        for name, g in grads.items():
            if g is None:  # a layer that did not run has no gradient, as with plain autograd
                assert grads_p[name] is None, name
            else:
                torch.testing.assert_close(g, grads_p[name], rtol=1e-5, atol=1e-7, msg=name)
        assert {n for n in "abc" if seen.get(getattr(ours, n)) == "merged"} >= set(use)


def test_trainable_base_weight_and_bias_get_the_same_gradients():
    ours, plain = _fan_pair(train_base=True)
    x = torch.randn(4, 3, 12)
    for _ in range(2):
        _, grads = _fan_step(ours, x)
        _, grads_p = _fan_step(plain, x)
        assert {"a.weight", "b.weight", "c.weight", "a.bias"} <= set(grads)
        for name, g in grads.items():
            torch.testing.assert_close(g, grads_p[name], rtol=1e-5, atol=1e-7, msg=name)


def test_merged_without_grad_is_the_nograd_path():
    ours, plain = _fan_pair()
    x = torch.randn(4, 12)
    with torch.no_grad(), record_paths() as seen:
        assert torch.equal(ours.a(x), plain.a(x))  # same (PEFT's) formula without autograd
    assert seen[ours.a] == "nograd"
    with record_paths() as seen:
        torch.testing.assert_close(ours.a(x), plain.a(x), rtol=1e-5, atol=1e-6)
    assert seen[ours.a] == "merged"


def test_merged_saves_only_x_once_per_group():
    from bench_harness import saved_activation_bytes

    ours, _ = _adapted("opt", targets=["q_proj", "k_proj", "v_proj"])
    torch.manual_seed(0)
    floor = TINY_MODELS["opt"][0]().train().requires_grad_(False)  # the un-adapted model
    floor.get_input_embeddings().weight.requires_grad_(True)
    ids = torch.randint(0, 96, (2, 7))
    saved = {}
    for path in ("lean", "merged", "plain"):
        model = set_vera_path(copy.deepcopy(ours), path)
        model.get_input_embeddings().weight.requires_grad_(True)
        for _ in range(2):  # second forward: merged q/k/v in one node
            saved[path] = saved_activation_bytes(model, ids)
    base = saved_activation_bytes(floor, ids)
    x_bytes = 2 * 14 * 32 * 4  # one q/k/v input per decoder layer (2 layers, N=14 tokens, hidden 32, float32)
    assert saved["merged"] - base == saved["lean"] - base == x_bytes
    assert saved["plain"] - base == 2 * 3 * 14 * (16 + 32) * 4  # h and u per layer, as PEFT
