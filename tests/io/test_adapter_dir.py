"""save_adapter/load_adapter (checkpoint.py): PEFT interop both ways, file layout, bad files, atomic saves.

Modules: vera_lightning/io/adapter_read.py, vera_lightning/io/peft_format.py.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from helpers.models import model_inputs, run, tiny_bert, tiny_gpt2, tiny_opt
from helpers.peft_oracle import peft_vera
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vera_lightning import (
    VeraConfig,
    adapter_batch,
    add_adapter,
    apply_vera,
    disable_adapter,
    find_adapter,
    load_adapter,
    save_adapter,
    unload_vera,
)
from vera_lightning.core.lookup import vera_layers

pytestmark = pytest.mark.numerics  # also run under every ATEN_CPU_CAPABILITY by .ci/run


def _quiet_config(**fields):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VeraConfig(**fields)


def _train_like_(model, seed=1):
    """Give every trainable tensor random values (as if trained)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


CASES = {  # kind, builder, fields
    "bert+classifier": ("bert", tiny_bert, {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}),
    "opt": ("opt", tiny_opt, {"target_modules": ["q_proj", "v_proj"]}),
    "gpt2-bias-all": ("gpt2", tiny_gpt2, {"target_modules": ["c_attn"], "bias": "all", "fan_in_fan_out": True}),
    "bert-vera_only": ("bert", tiny_bert, {"target_modules": ["query"], "bias": "vera_only",
                                           "modules_to_save": ["classifier"]}),
}


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_ours_to_peft(tmp_path, case, save_projection):
    import peft

    kind, build, fields = CASES[case]
    torch.manual_seed(0)
    base = build()
    other = copy.deepcopy(base)
    ours = apply_vera(base, _quiet_config(r=16, save_projection=save_projection, **fields))
    _train_like_(ours)
    save_adapter(ours, tmp_path / "a", base_model_name_or_path="tiny")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VERA" and saved["r"] == 16 and saved["base_model_name_or_path"] == "tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(other, str(tmp_path / "a"))
    with torch.no_grad():
        a, b = run(ours, kind), run(theirs, kind)
    assert (a - b).abs().max().item() <= 1e-6 and (a - run(copy.deepcopy(build()), kind)).abs().max() > 1e-3


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_peft_to_ours(tmp_path, case, save_projection):
    kind, build, fields = CASES[case]
    torch.manual_seed(0)
    base = build()
    mine = copy.deepcopy(base)
    theirs = peft_vera(base, r=16, save_projection=save_projection, init_weights=False, **fields)
    _train_like_(theirs)
    theirs.save_pretrained(str(tmp_path / "p"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_adapter(mine, tmp_path / "p")
    assert sum(1 for _ in vera_layers(mine)) > 0
    with torch.no_grad():
        a, b = run(mine, kind), run(theirs, kind)
    assert (a - b).abs().max().item() <= 1e-6


def test_load_into_already_adapted_model(tmp_path):
    torch.manual_seed(0)
    src = apply_vera(tiny_opt(), VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    _train_like_(src)
    save_adapter(src, tmp_path / "a")
    torch.manual_seed(0)
    dst = apply_vera(tiny_opt(), VeraConfig(r=8, target_modules=["v_proj", "q_proj"]))
    load_adapter(dst, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(run(dst, "opt"), run(src, "opt"))


def test_file_layout_and_metadata(tmp_path):
    model = apply_vera(tiny_opt(), VeraConfig(r=8, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    assert keys == {"base_model.vera_A", "base_model.vera_B"} | {
        f"base_model.model.model.decoder.layers.{i}.self_attn.q_proj.vera_lambda_{s}" for i in (0, 1) for s in "bd"}
    assert len(meta["vera_lightning.projection_sha256"]) == 64 and len(meta["vera_lightning.content_sha256"]) == 64


# ---------------------------------------------------------------------- bad input
@pytest.fixture
def saved(tmp_path):
    """A trained tiny-OPT adapter (q,v r=8, with projections) and one without projections."""
    torch.manual_seed(0)
    src = apply_vera(tiny_opt(), VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    _train_like_(src)
    save_adapter(src, tmp_path / "with")
    torch.manual_seed(0)  # the same base, adapted without storing the projections, holding the same λ's
    seed_only = apply_vera(tiny_opt(), _quiet_config(r=8, target_modules=["q_proj", "v_proj"], save_projection=False))
    seed_only.load_state_dict(src.state_dict(), strict=False)
    save_adapter(seed_only, tmp_path / "seed")
    return tmp_path


def _rewrite(path, drop=(), metadata=None):
    tensors = load_file(path)
    with safe_open(path, "pt") as fh:
        meta = fh.metadata()
    meta = metadata(meta) if metadata else meta
    save_file({k: v for k, v in tensors.items() if k not in drop}, path, metadata=meta)


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _bad(directory, kind):
    """Corrupt the adapter in ``directory`` in one of the ways load_adapter must catch."""
    weights = directory / "adapter_model.safetensors"
    if kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "corrupted-bytes":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif kind == "corrupted-header":
        weights.write_bytes(b"\xff" * 8 + b"not a header" * 10)
    elif kind == "missing-projection":
        _rewrite(weights, drop=("base_model.vera_A",),
                 metadata=lambda m: {k: v for k, v in m.items() if "content" not in k})
    elif kind == "pickle-only":
        weights.rename(directory / "adapter_model.bin")
    elif kind == "lora":
        _edit_config(directory, peft_type="LORA")
    elif kind == "unknown-option":
        _edit_config(directory, use_dora=True)


BAD_FILES = {
    "truncated": r"truncated or corrupted",
    "corrupted-bytes": r"content checksum mismatch",
    "corrupted-header": r"truncated or corrupted",
    "missing-projection": r"save_projection=True but \['base_model.vera_A'\] are missing",
    "pickle-only": r"adapter_model.bin, a pickle, which is never loaded",
    "lora": r"peft_type='LORA'.*VeRA adapters",
    "unknown-option": r"\['use_dora'\] that vera_lightning does not implement",
}


@pytest.mark.parametrize("adapted", [False, True])
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_files_raise_one_error_model_untouched(saved, kind, adapted):
    _bad(saved / "with", kind)
    torch.manual_seed(0)
    model = tiny_opt()
    if adapted:
        apply_vera(model, VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    before = _snapshot(model)
    with pytest.raises((ValueError, FileNotFoundError), match=BAD_FILES[kind]):
        load_adapter(model, saved / "with")
    assert _unchanged(model, before) and (sum(1 for _ in vera_layers(model)) > 0) == adapted


def test_seed_only_adapter_with_disagreeing_projections(saved):
    _edit_config(saved / "seed", projection_prng_key=1)  # regenerated draw now differs from the recorded checksum
    torch.manual_seed(0)
    model = tiny_opt()
    before = _snapshot(model)
    with pytest.raises(ValueError,
                       match=r"regenerated from projection_prng_key=1 differ .*checksum recorded at save time"):
        load_adapter(model, saved / "seed")
    assert _unchanged(model, before) and not list(vera_layers(model))


def test_seed_only_adapter_loads(saved):
    with safe_open(saved / "seed" / "adapter_model.safetensors", "pt") as fh:
        assert not any("vera_A" in k or "vera_B" in k for k in fh.keys())
    torch.manual_seed(0)
    model = tiny_opt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_adapter(model, saved / "seed")
    torch.manual_seed(0)
    ref = tiny_opt()
    load_adapter(ref, saved / "with")
    with torch.no_grad():
        assert torch.equal(run(model, "opt"), run(ref, "opt"))


@pytest.mark.parametrize("case,match", [
    ("shapes", r"shape of base_model.model.model.decoder.layers.0.self_attn.q_proj.vera_lambda_b: "
               r"adapter \(32,\), model \(48,\)"),
    ("targets", r"(?s)lacks .*k_proj.vera_lambda_b.*no place in the model .*v_proj.vera_lambda_b"),
    ("r", r"r: the adapter has r=8 but the model was adapted with 16"),
    ("nothing-matches", r"target layers: .*matches no nn.Linear/Conv1D.*Candidate layer names"),
])
def test_mismatched_model_raises_model_untouched(saved, case, match):
    torch.manual_seed(0)
    model = {"shapes": lambda: tiny_opt(48), "nothing-matches": tiny_bert}.get(case, tiny_opt)()
    if case == "targets":
        apply_vera(model, VeraConfig(r=8, target_modules=["q_proj", "k_proj"]))
    elif case == "r":
        apply_vera(model, VeraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, saved / "with")
    assert _unchanged(model, before)


# ---------------------------------------------------------------------- atomic save
def test_save_refuses_foreign_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    model = apply_vera(tiny_opt(), VeraConfig(r=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"refuses to replace .*\['notes.txt'\], which are not adapter files"):
        save_adapter(model, tmp_path / "d")
    assert os.listdir(tmp_path / "d") == ["notes.txt"]


def test_crash_mid_save_keeps_previous_adapter(tmp_path, monkeypatch):
    import vera_lightning.io.adapter_files as adapter_files

    model = apply_vera(tiny_opt(), VeraConfig(r=8, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    original = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    _train_like_(model)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_files, "write_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary directory left behind
    monkeypatch.undo()
    save_adapter(model, tmp_path / "a")  # replacing an adapter directory is allowed
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() != original


def test_save_without_vera_raises(tmp_path):
    with pytest.raises(ValueError, match="carries no VeRA adapter; call apply_vera first"):
        save_adapter(tiny_opt(), tmp_path / "a")


# ---------------------------------------------------------------------- merged export
def test_merged_export_loads_as_plain_transformers_model(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = apply_vera(tiny_opt(), VeraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    _train_like_(model)
    inputs = model_inputs("opt")
    with torch.no_grad():
        adapted = run(model, "opt")
    unload_vera(model, merge=True)
    model.save_pretrained(tmp_path / "merged")
    assert not any("vera" in f for f in os.listdir(tmp_path / "merged"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("vera" in k for k in plain.state_dict())
    with torch.no_grad():
        out = run(plain, "opt", inputs)
    assert (out - adapted).abs().max().item() <= 1e-5 and (adapted - run(tiny_opt(), "opt")).abs().max() > 1e-3


def test_seed_only_save_checks_projections_come_from_the_seed(tmp_path):
    config = _quiet_config(r=8, target_modules=["q_proj"], save_projection=False)
    half = apply_vera(tiny_opt().to(torch.bfloat16), config)  # rounded projections are still the seed's draw
    save_adapter(half, tmp_path / "half")
    model = apply_vera(tiny_opt(), config)
    with torch.no_grad():
        model.vera_projections.vera_A.mul_(2)
    with pytest.raises(ValueError, match=r"save_projection=False but the model's vera_A/vera_B are not the ones"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------- open blocks (issue 23)
@pytest.mark.parametrize("block", ["disable_adapter", "adapter_batch"])
def test_load_inside_an_open_block_is_refused_model_unchanged(tmp_path, block):
    """Loading would change what the block serves (an adapter_batch gathered its λ's when it opened)."""
    config = VeraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    model = add_adapter(apply_vera(tiny_opt(), config), "b", config)
    _train_like_(model)
    save_adapter(model, tmp_path / "b", adapter_name="b")
    with torch.no_grad():
        for _, layer in vera_layers(model):
            layer.vera_lambda_b_b.add_(1.0)
    before = _snapshot(model)
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    opener = disable_adapter(model) if block == "disable_adapter" else adapter_batch(model, ["b", None])
    shown = "disable_adapter" if block == "disable_adapter" else r"adapter_batch\(model, \['b', None\]\)"
    with torch.no_grad(), opener:
        served = model(input_ids=ids).logits
        with pytest.raises(ValueError, match=rf"^load_adapter\('.*/b'\) refused, the model was not changed: a `with "
                                             rf"{shown}.*:` block is open on this model.*Close the block first"):
            load_adapter(model, tmp_path / "b", adapter_name="b")
        assert _unchanged(model, before) and torch.equal(model(input_ids=ids).logits, served)
    assert find_adapter(model).open_block is None
    load_adapter(model, tmp_path / "b", adapter_name="b")  # once the block is closed
    assert not _unchanged(model, before)
