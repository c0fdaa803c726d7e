"""The lean autograd paths and sibling sharing against the plain path and against PEFT.

Modules: vera_lightning/forward/lowrank.py, vera_lightning/forward/sharing.py.
"""

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

pytestmark = pytest.mark.numerics  # also run under every ATEN_CPU_CAPABILITY by .ci/run

# "auto" may pick the merged form (not bit-identical to plain): tested against PEFT in test_merged.py
FAST = [("lean", True), ("lean", False), ("save_h", True), ("save_h", False)]


def _embeds(model, kind, dtype=torch.float32, seed=0):
    """Input embeddings that require grad, so the input gradient is checked too."""
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(3, 12, generator=g, dtype=dtype).requires_grad_(True)
    ids = torch.randint(0, 96, (2, 7), generator=g)
    return model.get_input_embeddings()(ids).detach().to(dtype).requires_grad_(True)


def _forward(model, kind, emb):
    return model(emb) if kind == "mlp" else model(inputs_embeds=emb).logits


def _adapted(kind, dtype=torch.float32, targets=None, **fields):
    torch.manual_seed(0)
    base = TINY_MODELS[kind][0]().to(dtype)
    other = copy.deepcopy(base)
    fields.setdefault("target_modules", targets or TINY_MODELS[kind][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = apply_vera(base, VeraConfig(r=16, **fields))
    theirs = peft_vera(other, r=16, **fields)
    randomize_lambdas_(ours, theirs)
    return ours, theirs


def _grads(model, kind, emb, named):
    out = _forward(model, kind, emb)
    (out.float().square().mean() + out.float().mean()).backward()
    grads = {n: {p: getattr(l, p).grad.clone() for p in ("vera_lambda_b", "vera_lambda_d")} for n, l in named}
    return out.detach(), grads, emb.grad.clone()


def _peft_named(theirs, names):
    class _View:  # PEFT keeps the λ's in per-adapter dicts
        def __init__(self, layer):
            self.vera_lambda_b, self.vera_lambda_d = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]

    return [(n, _View(peft_layer(theirs, n))) for n in names]


CASES = [("opt", ["q_proj", "k_proj", "v_proj", "fc1"]), ("llama", None), ("mlp", None), ("gpt2", None),
         ("bert", None)]


@pytest.mark.parametrize("kind,targets", CASES)
@pytest.mark.parametrize("path,share", FAST)
def test_fast_path_matches_plain_and_peft(kind, targets, path, share):
    ours, theirs = _adapted(kind, targets=targets)
    plain = copy.deepcopy(ours)
    set_vera_path(plain, "plain", share=False)
    set_vera_path(ours, path, share=share)
    names = [n for n, _ in vera_layers(ours)]
    with record_paths() as seen:
        out_f, g_f, gx_f = _grads(ours, kind, _embeds(ours, kind), list(vera_layers(ours)))
        out_p, g_p, gx_p = _grads(plain, kind, _embeds(plain, kind), list(vera_layers(plain)))
    out_t, g_t, gx_t = _grads(theirs, kind, _embeds(ours, kind), _peft_named(theirs, names))
    assert {seen[l] for _, l in vera_layers(ours)} == {"save_h" if path == "save_h" else "lean"}
    assert {seen[l] for _, l in vera_layers(plain)} == {"plain"}
    assert torch.equal(out_f, out_p)  # same forward operations: bit-identical
    torch.testing.assert_close(out_f, out_t, rtol=0, atol=1e-6)
    for ref_grads, ref_gx in ((g_p, gx_p), (g_t, gx_t)):
        torch.testing.assert_close(gx_f, ref_gx, rtol=1e-5, atol=1e-6)
        for n in names:
            for p in ("vera_lambda_b", "vera_lambda_d"):
                torch.testing.assert_close(g_f[n][p], ref_grads[n][p], rtol=1e-5, atol=1e-6)
        assert any(g[p].abs().max() > 0 for g in g_f.values() for p in g)


@pytest.mark.parametrize("kind,targets,expected", [
    ("opt", ["q_proj", "k_proj", "v_proj"], 2 * 2),  # 2 layers x (k, v reuse q's h)
    ("opt", ["q_proj", "v_proj"], 2 * 1),
    ("llama", None, 2 * (2 + 1)),  # q/k/v and gate/up
    ("mlp", None, 0),
])
@pytest.mark.parametrize("share", [True, False])
def test_sibling_sharing_is_automatic_and_switchable(kind, targets, expected, share):
    ours, _ = _adapted(kind, targets=targets)
    set_vera_path(ours, "auto", share=share)
    cache = ours.vera_projections.siblings
    _forward(ours, kind, _embeds(ours, kind)).sum().backward()
    assert cache.hits == (expected if share else 0)


def test_dropout_falls_back_to_plain_path():
    ours, theirs = _adapted("opt", targets=["q_proj", "k_proj", "v_proj"], vera_dropout=0.3)
    ours.train(), theirs.train()
    torch.manual_seed(5)
    with record_paths() as seen:
        out = _forward(ours, "opt", _embeds(ours, "opt"))
    out.sum().backward()
    assert {seen[l] for _, l in vera_layers(ours)} == {"plain"}
    assert ours.vera_projections.siblings.hits == 0
    torch.manual_seed(5)  # same masks drawn in the same order as PEFT
    ref = _forward(theirs, "opt", _embeds(ours, "opt"))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    ours.eval()  # dropout inactive: the fast paths (and sharing) come back
    with record_paths() as seen:
        _forward(ours, "opt", _embeds(ours, "opt")).sum().backward()
    assert len({seen[l] for _, l in vera_layers(ours)}) == 1
    assert {seen[l] for _, l in vera_layers(ours)} <= {"lean", "save_h", "merged"}
    assert ours.vera_projections.siblings.hits == 4


class TwoInputs(nn.Module):
    """a and b read x (in 12), c reads y (in 20): only a/b may share, c has another A slice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 6), nn.Linear(12, 9), nn.Linear(20, 6)

    def forward(self, x, y):
        return self.a(x).sum(-1) + self.b(x).sum(-1) * self.c(y).mean(-1)


@pytest.mark.parametrize("share", [True, False])
def test_layers_with_different_in_features(share):
    torch.manual_seed(0)
    model = TwoInputs()
    other = copy.deepcopy(model)
    ours = apply_vera(model, VeraConfig(r=8, target_modules=["a", "b", "c"], init_weights=False))
    plain = apply_vera(other, VeraConfig(r=8, target_modules=["a", "b", "c"], init_weights=False))
    with torch.no_grad():
        for (_, l1), (_, l2) in zip(vera_layers(ours), vera_layers(plain)):
            l2.vera_lambda_d.copy_(l1.vera_lambda_d)
    set_vera_path(ours, "lean", share=share), set_vera_path(plain, "plain")
    x, y = torch.randn(4, 12, requires_grad=True), torch.randn(4, 20, requires_grad=True)
    x2, y2 = x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
    out, ref = ours(x, y), plain(x2, y2)
    out.sum().backward(), ref.sum().backward()
    assert torch.equal(out, ref)
    assert ours.vera_projections.siblings.hits == (1 if share else 0)
    torch.testing.assert_close(x.grad, x2.grad), torch.testing.assert_close(y.grad, y2.grad)
    for (_, l1), (_, l2) in zip(vera_layers(ours), vera_layers(plain)):
        torch.testing.assert_close(l1.vera_lambda_d.grad, l2.vera_lambda_d.grad)
        torch.testing.assert_close(l1.vera_lambda_b.grad, l2.vera_lambda_b.grad)


def test_inplace_change_of_input_breaks_sharing():
    torch.manual_seed(0)
    model = apply_vera(TwoInputs(), VeraConfig(r=8, target_modules=["a", "b"]))
    x = torch.randn(4, 12)
    model.a(x)
    x.add_(1.0)
    model.b(x)
    assert model.vera_projections.siblings.hits == 0


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def assert_no_worse_than_peft(ours, theirs, reference, what, margin=1e-3):
    """Half precision: our error against a float32 reference is at most PEFT's (x1.5) plus a margin.

    A fixed tolerance between the two implementations depends on the CPU's kernels
    (ATEN_CPU_CAPABILITY changes their rounding); their distance to the exact value does not move.
    """
    ours_err, peft_err = _rel(ours, reference), _rel(theirs, reference)
    assert ours_err <= 1.5 * peft_err + margin, f"{what}: ours {ours_err:.2e} vs PEFT {peft_err:.2e} from float32"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["lean", "save_h"])
def test_half_precision_fast_path(dtype, path):
    ours, theirs = _adapted("llama", dtype=dtype)
    reference = set_vera_path(copy.deepcopy(ours).float(), "plain", share=False)  # same values, float32 math
    set_vera_path(ours, path)
    names = [n for n, _ in vera_layers(ours)]
    emb = _embeds(ours, "llama", dtype)
    out_f, g_f, gx_f = _grads(ours, "llama", emb.detach().clone().requires_grad_(True), list(vera_layers(ours)))
    out_t, g_t, gx_t = _grads(theirs, "llama", emb.detach().clone().requires_grad_(True), _peft_named(theirs, names))
    out_r, g_r, gx_r = _grads(reference, "llama", emb.detach().float().requires_grad_(True),
                              list(vera_layers(reference)))
    assert out_f.dtype == dtype and torch.equal(out_f, out_t)  # forward stays bit-identical to PEFT
    assert ours.vera_projections.siblings.hits == 6
    # PEFT sums the siblings' input gradients in half precision, we in float32 then round once.
    assert_no_worse_than_peft(gx_f, gx_t, gx_r, "grad x")
    for n in names:
        for p in ("vera_lambda_b", "vera_lambda_d"):
            assert g_f[n][p].dtype == torch.float32
            assert_no_worse_than_peft(g_f[n][p], g_t[n][p], g_r[n][p], f"{n}.{p}")


def test_no_grad_forward_is_bit_identical_and_shares():
    ours, theirs = _adapted("opt", targets=["q_proj", "k_proj", "v_proj"])
    with torch.no_grad(), record_paths() as seen:
        a = _forward(ours, "opt", _embeds(ours, "opt"))
        b = _forward(theirs, "opt", _embeds(ours, "opt"))
    assert {seen[l] for _, l in vera_layers(ours)} == {"nograd"}
    assert ours.vera_projections.siblings.hits == 4
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_inference_mode_forward():
    ours, _ = _adapted("opt", targets=["q_proj", "k_proj", "v_proj"])
    with torch.no_grad():
        ref = _forward(ours, "opt", _embeds(ours, "opt"))
    with torch.inference_mode():
        out = _forward(ours, "opt", _embeds(ours, "opt").detach())
    assert torch.equal(out, ref)


def _saved(fn):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages


def test_lean_path_saves_only_the_input():
    torch.manual_seed(0)
    model = apply_vera(TwoInputs(), VeraConfig(r=64, target_modules=["a", "b"]))
    x = torch.randn(256, 12, requires_grad=True)
    params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    set_vera_path(model, "lean")
    lean = {k: v for k, v in _saved(lambda: (model.a(x), model.b(x))).items() if k not in params}
    assert lean == {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes()}  # x once, for both siblings
    set_vera_path(model, "save_h")
    save_h = {k: v for k, v in _saved(lambda: (model.a(x), model.b(x))).items() if k not in params}
    assert sorted(save_h.values()) == [256 * 64 * 4]  # one h for the pair
    set_vera_path(model, "plain")
    plain = sum(v for k, v in _saved(lambda: (model.a(x), model.b(x))).items() if k not in params)
    assert plain == 2 * 256 * 64 * 4 + 256 * (6 + 9) * 4  # h and u per layer


def test_bad_path_and_deepcopy_after_forward():
    ours, _ = _adapted("opt")
    with pytest.raises(ValueError, match=r"set_vera_path\(path='fastest'\): must be one of"):
        set_vera_path(ours, "fastest")
    _forward(ours, "opt", _embeds(ours, "opt"))  # the cache now holds a non-leaf h
    clone = copy.deepcopy(ours)
    assert clone.vera_projections.siblings.hits == 0 and clone.vera_projections.siblings.enabled


class SharedInputNet(nn.Module):
    """Two siblings reading the caller's tensor directly (no layer in between)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(12, 6)
        self.k = nn.Linear(12, 6)

    def forward(self, x):
        return self.q(x) * self.k(x)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_same_input_object_across_steps_is_not_shared_between_passes(requires_grad):
    torch.manual_seed(0)
    fast = apply_vera(SharedInputNet(), VeraConfig(r=8, target_modules=["q", "k"], init_weights=False))
    plain = set_vera_path(copy.deepcopy(fast), "plain", share=False)
    x = torch.randn(4, 12, requires_grad=requires_grad)  # one batch object fed step after step
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (fast, plain)]
    for _ in range(3):
        for model, opt in zip((fast, plain), opts):
            model(x).square().mean().backward()  # a reused graph node would fail or go stale here
            opt.step()
            opt.zero_grad()
    assert fast.vera_projections.siblings.hits == 3  # k reuses q's h within each pass, never across
    for (_, a), (_, b) in zip(vera_layers(fast), vera_layers(plain)):
        torch.testing.assert_close(a.vera_lambda_b, b.vera_lambda_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.vera_lambda_d, b.vera_lambda_d, rtol=1e-5, atol=1e-6)


def _autocast_grads(model, kind, named):
    """λ-gradients with the forward under bf16 autocast and backward outside it, as Lightning runs them."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _forward(model, kind, _embeds(model, kind))
    (out.float().square().mean() + out.float().mean()).backward()
    return {n: {p: getattr(l, p).grad.clone() for p in ("vera_lambda_b", "vera_lambda_d")} for n, l in named}


@pytest.mark.numerics
@pytest.mark.parametrize("path", ["auto", "plain", "lean", "save_h", "merged"])
def test_every_path_trains_under_bf16_autocast(path):
    """Under ``torch.autocast(bfloat16)`` (Lightning's ``bf16-mixed``) each path runs backward (the forward ran in
    bf16, the backward does not: the lean nodes cast before their products) and its λ-gradients are no further
    from the float32 values than PEFT's under the same autocast."""
    kind = "llama"
    ours, theirs = _adapted(kind)
    set_vera_path(ours, path)
    named = list(vera_layers(ours))
    reference_model = copy.deepcopy(ours)
    _, reference, _ = _grads(reference_model, kind, _embeds(ours, kind), list(vera_layers(reference_model)))
    mine = _autocast_grads(ours, kind, named)
    peft_grads = _autocast_grads(theirs, kind, _peft_named(theirs, [n for n, _ in named]))
    for name, _ in named:
        for p in ("vera_lambda_b", "vera_lambda_d"):
            assert torch.isfinite(mine[name][p]).all()
            assert_no_worse_than_peft(mine[name][p], peft_grads[name][p], reference[name][p], f"{path} {name}.{p}",
                                      margin=2e-2)
