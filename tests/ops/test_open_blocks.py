"""Open adapter blocks are a state (issue 23, items 3, 4, 5 and 11).

While a ``disable_adapter`` or ``adapter_batch`` block is open, every operation that would change what it
serves is refused before anything changes, naming the operation, the block and the fix; after the block
closes it works. ``add_adapter`` of a new name is allowed inside a block. ``add_adapter``/``set_adapter``/
``delete_adapter`` on a part of an adapted model are refused. See docs/reliability.md, *Open adapter blocks*.
"""

from __future__ import annotations

import pytest
import torch
from helpers.lightning import TinyOptModule, snapshot
from helpers.named import multi_adapter_model, named_config, randomize_named
from torch import nn

from vera_lightning import (
    VeraLinear,
    adapter_batch,
    add_adapter,
    apply_vera,
    delete_adapter,
    disable_adapter,
    find_adapter,
    load_adapter,
    merge_vera,
    save_adapter,
    set_adapter,
    unload_vera,
    unmerge_vera,
)
from vera_lightning.core.adapter import check_no_open_block
from vera_lightning.core.lookup import vera_layers

pytestmark = pytest.mark.numerics  # rows are compared bit for bit with each adapter's own output

ROWS = ["task_b", None, "default"]
BLOCKS = {
    "adapter_batch": (lambda model: adapter_batch(model, ROWS),
                      r"adapter_batch\(model, \['task_b', None, 'default'\]\)"),
    "disable_adapter": (disable_adapter, r"disable_adapter\(model\)"),
}
IDS = torch.randint(3, 96, (3, 7), generator=torch.Generator().manual_seed(0))


def _forward(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _expected(model, block):
    """What the open block must serve, computed outside any block: row i through its adapter, or the base."""
    adapter = find_adapter(model)
    active = adapter.active
    with disable_adapter(model):
        base = _forward(model)
    if block == "disable_adapter":
        return base
    rows = []
    for i, name in enumerate(ROWS):
        rows.append(base[i] if name is None else _forward(set_adapter(model, name))[i])
    set_adapter(model, active)
    return torch.stack(rows)


def _state(model):
    """Everything an operation could change: tensors (λ's, weights), registry, merged flags, modules, grads."""
    adapter = find_adapter(model)
    return {
        "tensors": snapshot(model),
        "registry": (adapter.names, adapter.active) if adapter is not None else None,
        "merged": [layer.merged for _, layer in vera_layers(model)],
        "serving": [layer.active_lambda_names for _, layer in vera_layers(model)],
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "grad": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def _assert_same(model, before):
    after = _state(model)
    assert set(after["tensors"]) == set(before["tensors"])
    changed = [k for k, v in before["tensors"].items() if not torch.equal(after["tensors"][k], v)]
    assert changed == []
    for key in ("registry", "merged", "serving", "modules", "grad"):
        assert after[key] == before[key], key


def _lambdas(model, name):
    adapter = find_adapter(model)
    return [getattr(layer, attr).detach().clone() for _, layer in vera_layers(model) for attr in
            adapter.lambda_names(name)]


def _prepare_load(model, tmp_path):
    save_adapter(model, tmp_path / "c", adapter_name="task_c")
    saved = _lambdas(model, "task_c")
    randomize_named(model, "task_c", seed=99)
    return saved


def _loaded(model, saved):
    return all(torch.equal(a, b) for a, b in zip(_lambdas(model, "task_c"), saved))


def _merged(model, _):
    return all(layer.merged for _, layer in vera_layers(model))


def _merges_and_unmerges(model, _):  # (a block cannot open over merged layers: unmerge_vera was a no-op there)
    merge_vera(model)
    unmerge_vera(model)
    return not any(layer.merged for _, layer in vera_layers(model))


def _unloaded(model, _):
    return find_adapter(model) is None and not any(isinstance(m, VeraLinear) for m in model.modules())


def _names(*names):
    return lambda model, _: find_adapter(model).names == list(names)


def _active(name):
    return lambda model, _: find_adapter(model).active == name


def _add_task_b(model, _):
    add_adapter(model, "task_b", named_config("opt"))


# (the call, how its message starts, prepare(model, tmp_path) -> what check reads, check after the block)
OPERATIONS = [
    pytest.param(lambda m, d: merge_vera(m), "merge_vera", None, _merged, id="merge_vera"),
    pytest.param(lambda m, d: merge_vera(m, safe_merge=True), "merge_vera", None, _merged, id="merge_vera_safe"),
    pytest.param(lambda m, d: unmerge_vera(m), "unmerge_vera", None, _merges_and_unmerges, id="unmerge_vera"),
    pytest.param(lambda m, d: unload_vera(m), r"unload_vera\(merge=True\)", None, _unloaded, id="unload_vera"),
    pytest.param(lambda m, d: unload_vera(m, merge=False), r"unload_vera\(merge=False\)", None, _unloaded,
                 id="unload_vera_unmerged"),
    pytest.param(lambda m, d: delete_adapter(m, "task_b"), "delete_adapter", None, _names("default", "task_c"),
                 id="delete_an_adapter_the_block_serves"),
    pytest.param(lambda m, d: delete_adapter(m, "task_c"), "delete_adapter", None, _names("default", "task_b"),
                 id="delete_another_adapter"),
    pytest.param(lambda m, d: set_adapter(m, "task_b"), "set_adapter", None, _active("task_b"), id="set_adapter"),
    pytest.param(lambda m, d: set_adapter(m, "default"), "set_adapter", None, _active("default"),
                 id="set_the_active_adapter"),
    pytest.param(_add_task_b, r"add_adapter\('task_b'\)", None, None, id="add_an_existing_name"),
    pytest.param(lambda m, d: load_adapter(m, d / "c", adapter_name="task_c"), r"load_adapter\('.*'\)",
                 _prepare_load, _loaded, id="load_adapter"),
]


@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("call, starts, prepare, check", OPERATIONS)
def test_an_open_block_refuses_what_would_change_what_it_serves(block, call, starts, prepare, check, tmp_path):
    _, model, _ = multi_adapter_model("opt")
    ready = prepare(model, tmp_path) if prepare is not None else None
    expected = _expected(model, block)
    opener, shown = BLOCKS[block]
    adapter = find_adapter(model)
    with opener(model):
        served = _forward(model)
        assert torch.equal(served, expected)  # row i: its adapter (or the base), as computed outside the block
        before = _state(model)
        with pytest.raises(ValueError, match=rf"^{starts} refused, the model was not changed: a `with {shown}:` "
                                             r"block is open on this model \(.*\), and \w+ would change what it "
                                             r"serves\. Close the block first \(leave the `with` statement\), then "
                                             r"call \w+$"):
            call(model, tmp_path)
        _assert_same(model, before)  # λ's, weights, names, active, merged flags, modules, requires_grad
        assert adapter.open_block is not None
        assert torch.equal(_forward(model), served)  # still serving what it served
    assert adapter.open_block is None
    if check is None:  # add_adapter of a held name: the ordinary refusal, whose fix works outside a block
        with pytest.raises(ValueError, match=r"already holds an adapter named 'task_b' \(it holds .*\); choose "
                                             r"another name, or delete_adapter\(model, name\) first"):
            call(model, tmp_path)
        delete_adapter(model, "task_b")
        call(model, tmp_path)
        assert find_adapter(model).names == ["default", "task_c", "task_b"]
    else:
        call(model, tmp_path)
        assert check(model, ready)


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_adding_a_new_name_inside_a_block_is_allowed(block):
    """The block never serves a name added after it opened: adding one changes nothing it serves."""
    _, model, _ = multi_adapter_model("opt")
    expected = _expected(model, block)
    opener, _ = BLOCKS[block]
    with opener(model):
        add_adapter(model, "fresh", named_config("opt"))
        assert torch.equal(_forward(model), expected)
        assert find_adapter(model).names == ["default", "task_b", "task_c", "fresh"]
        assert find_adapter(model).active == "default"
    before = _forward(model)
    with torch.no_grad():
        for _, layer in vera_layers(model):
            layer.vera_lambda_b_fresh.fill_(0.5)
    assert torch.equal(_forward(model), before)  # inactive until set
    fresh = _forward(set_adapter(model, "fresh"))
    assert not torch.equal(fresh, before)
    with adapter_batch(model, ["fresh", None, "fresh"]):  # and a later block serves it
        mixed = _forward(model)
    assert torch.equal(mixed[0], fresh[0]) and torch.equal(mixed[2], fresh[2])


def test_nesting_names_the_open_block():
    _, model, _ = multi_adapter_model("opt")
    with adapter_batch(model, ROWS):
        with pytest.raises(ValueError, match=r"disable_adapter cannot be opened while another disable_adapter/"
                                             r"adapter_batch block is open \(`with adapter_batch\(model, "
                                             r"\['task_b', None, 'default'\]\):`\); close that block first"):
            with disable_adapter(model):
                pass


def test_check_no_open_block_on_a_model_without_vera_is_a_no_op():
    check_no_open_block(None, "load_adapter('x')")


# ---------------------------------------------------------------------- item 11: set_adapter in a grad block
def test_set_adapter_inside_a_batch_with_grad_on_is_refused():
    """Before: accepted; the block's λ's were gathered as constants, so backward failed with torch's own error."""
    _, model, _ = multi_adapter_model("opt")
    model.train()
    with adapter_batch(model, ["task_b", None]):
        before = _state(model)
        with pytest.raises(ValueError, match=r"^set_adapter refused, the model was not changed: a `with "
                                             r"adapter_batch\(model, \['task_b', None\]\):` block is open"):
            set_adapter(model, "task_b")
        _assert_same(model, before)
        out = model(input_ids=IDS[:2]).logits  # grad on: nothing in the batch trains, nothing is recorded
        assert not out.requires_grad
    set_adapter(model, "task_b")  # after the block: train task_b on its own
    model(input_ids=IDS[:2], labels=IDS[:2]).loss.backward()
    grads = [layer.vera_lambda_b_task_b.grad for _, layer in vera_layers(model)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    with adapter_batch(model, ["task_b", None]):  # a block opened now sees task_b's λ's train, and says so
        with pytest.raises(ValueError, match=r"adapters \['task_b'\] have trainable λ's and autograd is recording"):
            model(input_ids=IDS[:2])


# ---------------------------------------------------------------------- item 5: a part of an adapted model
@pytest.mark.parametrize("operation", ["set_adapter", "delete_adapter", "add_adapter"])
def test_registry_operations_on_a_part_of_the_model_are_refused(operation):
    """Before: set_adapter(decoder layer 0) switched its two layers and the registry, not layer 1 (half switched)."""
    _, model, _ = multi_adapter_model("opt")
    part = model.model.decoder.layers[0]
    calls = {"set_adapter": lambda m: set_adapter(m, "task_b"), "delete_adapter": lambda m: delete_adapter(m, "task_b"),
             "add_adapter": lambda m: add_adapter(m, "fresh", named_config("opt"))}
    before, output = _state(model), _forward(model)
    with pytest.raises(ValueError, match=rf"^{operation} refused, the model was not changed: OPTDecoderLayer is a part "
                                         r"of an adapted model \(it holds 2 of its VeRA layers but not its adapter, "
                                         r"`vera_projections`\).*call it on the module apply_vera adapted"):
        calls[operation](part)
    _assert_same(model, before)
    assert torch.equal(_forward(model), output)
    holder = nn.ModuleDict({"net": model})  # a module around the adapted model acts on all of it
    calls[operation](holder)
    adapter = find_adapter(model)
    if operation == "set_adapter":
        assert adapter.active == "task_b"
        assert {layer.active_lambda_names for _, layer in vera_layers(model)} == {adapter.lambda_names("task_b")}
        assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
            f"{n}.{a}" for n, _ in vera_layers(model) for a in adapter.lambda_names("task_b"))
    elif operation == "delete_adapter":
        assert adapter.names == ["default", "task_c"]
        assert not any("task_b" in k for k in model.state_dict())
    else:
        assert all(hasattr(layer, "vera_lambda_b_fresh") for _, layer in vera_layers(model))


def test_the_model_inside_an_adapted_lightning_module_is_a_part():
    """apply_vera(module) holds the adapter on the LightningModule: its inner model is a part, the module is not."""
    module = TinyOptModule()
    config = named_config("opt")
    apply_vera(module, config)
    add_adapter(module, "task_b", config)
    with pytest.raises(ValueError, match=r"^set_adapter refused, the model was not changed: OPTForCausalLM is a part "
                                         r"of an adapted model \(it holds 4 of its VeRA layers"):
        set_adapter(module.model, "task_b")
    assert find_adapter(module).active == "default"
    set_adapter(module, "task_b")
    wanted = find_adapter(module).lambda_names("task_b")
    assert {layer.active_lambda_names for _, layer in vera_layers(module)} == {wanted}
