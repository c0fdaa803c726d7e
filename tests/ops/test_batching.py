"""Mixed-adapter batches: row-by-row equality (forward and generate), shared h, cost, errors.

Modules: vera_lightning/forward/mixed.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers.named import multi_adapter_model
from torch.utils.flop_counter import FlopCounterMode

from vera_lightning import VeraPath, adapter_batch, disable_adapter, find_adapter, merge_vera, record_paths, set_adapter

pytestmark = pytest.mark.numerics

ROWS = ["task_b", None, "default", "task_c", "task_b", None]


def _inputs(kind, rows=None, seed=0):
    rows = len(ROWS) if rows is None else rows
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"x": torch.randn(rows, 12, generator=g)}
    ids = torch.randint(3, 96, (rows, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a padded row (right padding: these are not generating)
    return {"input_ids": ids, "attention_mask": mask}


def _forward(model, kind, inputs):
    return model(inputs["x"]) if kind == "mlp" else model(**inputs).logits


def _served_by(model, kind, inputs, name):
    """The whole batch through one adapter (``None``: the base model)."""
    if name is None:
        with disable_adapter(model):
            return _forward(model, kind, inputs)
    set_adapter(model, name)
    return _forward(model, kind, inputs)


def _row(inputs, i):
    return {k: v[i:i + 1] for k, v in inputs.items()}


@pytest.mark.parametrize("kind", ["bert", "opt", "gpt2", "llama", "mlp"])
def test_each_row_equals_its_adapter(kind):
    _, model, _ = multi_adapter_model(kind)
    inputs = _inputs(kind)
    with torch.no_grad():
        with record_paths() as seen, adapter_batch(model, ROWS) as same:
            assert same is model
            mixed = _forward(model, kind, inputs)
        assert set(seen.values()) == {VeraPath.mixed}
        for name in set(ROWS):
            full = _served_by(model, kind, inputs, name)
            for i in (i for i, n in enumerate(ROWS) if n == name):
                assert torch.equal(mixed[i], full[i]), (name, i)  # bit for bit over the same batch
                if name is None:
                    with disable_adapter(model):
                        alone = _forward(model, kind, _row(inputs, i))
                else:
                    alone = _forward(set_adapter(model, name), kind, _row(inputs, i))
                torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        distinct = {tuple(mixed[i].flatten()[:8].tolist()) for i in (0, 1, 2, 3)}
        assert len(distinct) == 4  # the adapters (and the base) really differ


def test_block_leaves_the_model_as_it_was():
    _, model, _ = multi_adapter_model("opt")
    set_adapter(model, "task_c")
    inputs = _inputs("opt")
    with torch.no_grad():
        before = _forward(model, "opt", inputs)
        with pytest.raises(RuntimeError, match="boom"):
            with adapter_batch(model, ROWS):
                raise RuntimeError("boom")
        adapter = find_adapter(model)
        assert adapter.forced_path is None and adapter.batch is None and adapter.active == "task_c"
        assert torch.equal(_forward(model, "opt", inputs), before)


def test_siblings_share_one_projection_and_cost_does_not_grow_with_adapters():
    _, model, _ = multi_adapter_model("llama", names=("default",) + tuple(f"a{i}" for i in range(6)))
    inputs = _inputs("llama")
    adapter = find_adapter(model)
    with torch.no_grad():
        hits = adapter.siblings.hits
        with adapter_batch(model, ["a0"] * 6):
            _forward(model, "llama", inputs)
        assert adapter.siblings.hits - hits == 2 * 3  # per block: k,v reuse q's h; up reuses gate's
        flops = {}
        for label, names in {"one": ["a0"] * 6, "six": [f"a{i}" for i in range(6)],
                             "mixed": ["a1", None, "default", "a2", "a1", None]}.items():
            with FlopCounterMode(display=False) as counter, adapter_batch(model, names):
                _forward(model, "llama", inputs)
            flops[label] = counter.get_total_flops()
        set_adapter(model, "a0")
        with FlopCounterMode(display=False) as counter:
            _forward(model, "llama", inputs)
    assert flops["one"] == flops["six"] == flops["mixed"] == counter.get_total_flops()


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_generate_each_row_as_alone_left_padded(kind):
    _, model, _ = multi_adapter_model(kind)
    names = ["task_b", None, "default", "task_c"]
    g = torch.Generator().manual_seed(3)
    lengths = [5, 3, 6, 4]
    ids = torch.zeros(4, 6, dtype=torch.long)
    mask = torch.zeros_like(ids)
    prompts = []
    for i, n in enumerate(lengths):
        prompts.append(torch.randint(3, 96, (1, n), generator=g))
        ids[i, 6 - n:], mask[i, 6 - n:] = prompts[-1][0], 1  # left padding
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True,
                    return_dict_in_generate=True, output_scores=True)
    with adapter_batch(model, names):
        mixed = model.generate(input_ids=ids, attention_mask=mask, **settings)
    new = mixed.sequences[:, 6:]
    assert len({tuple(row.tolist()) for row in new}) >= 3
    for i, name in enumerate(names):
        if name is None:
            with disable_adapter(model):
                full = model.generate(input_ids=ids, attention_mask=mask, **settings)
                alone = model.generate(input_ids=prompts[i], **settings)
        else:
            set_adapter(model, name)
            full = model.generate(input_ids=ids, attention_mask=mask, **settings)
            alone = model.generate(input_ids=prompts[i], **settings)
        assert torch.equal(mixed.sequences[i], full.sequences[i]), name  # same batch: bit for bit, scores too
        assert all(torch.equal(a[i], b[i]) for a, b in zip(mixed.scores, full.scores))
        assert torch.equal(new[i], alone.sequences[0, lengths[i]:]), name  # alone: the same greedy tokens


def test_sampled_generate_gives_each_row_its_adapters_tokens():
    """do_sample with one sequence per row: row i's tokens are those of the same batch through its adapter,
    from the same seed (sampling noise is drawn per row and step, whatever the other rows hold)."""
    _, model, _ = multi_adapter_model("opt")
    names = ["task_c", "default", None, "task_b", "task_c"]
    ids = torch.randint(3, 96, (5, 4), generator=torch.Generator().manual_seed(5))
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=True, top_k=0, temperature=1.5,
                    pad_token_id=0, use_cache=True)
    torch.manual_seed(11)
    with adapter_batch(model, names):
        mixed = model.generate(input_ids=ids, **settings)
    for name in set(names):
        torch.manual_seed(11)
        if name is None:
            with disable_adapter(model):
                full = model.generate(input_ids=ids, **settings)
        else:
            set_adapter(model, name)
            full = model.generate(input_ids=ids, **settings)
        rows = [i for i, n in enumerate(names) if n == name]
        assert torch.equal(mixed[rows], full[rows]), name
    torch.manual_seed(12)  # another seed draws other tokens: the test is not comparing greedy outputs
    with adapter_batch(model, names):
        assert not torch.equal(model.generate(input_ids=ids, **settings), mixed)


def test_beam_search_and_wrong_row_counts_are_refused():
    _, model, _ = multi_adapter_model("opt")
    ids = torch.randint(3, 96, (2, 5))
    with adapter_batch(model, ["task_b", "default"]):
        with pytest.raises(ValueError, match=r"maps 2 rows .*shape \(4, 5, 32\).*num_beams > 1"):
            model.generate(input_ids=ids, num_beams=2, max_new_tokens=2, pad_token_id=0)
    with torch.no_grad(), adapter_batch(model, ["task_b", "default", None]):
        with pytest.raises(ValueError, match="maps 3 rows"):
            model(input_ids=ids)


def test_bad_names_states_and_grad_are_refused():
    _, model, _ = multi_adapter_model("opt")
    ids = torch.randint(3, 96, (2, 5))
    with pytest.raises(ValueError, match=r"unknown adapter name\(s\) 'nope', 3; "
                                         r"the model holds \['default', 'task_b', 'task_c'\]"):
        with adapter_batch(model, ["nope", 3]):
            pass
    with pytest.raises(ValueError, match="names is empty"):
        with adapter_batch(model, []):
            pass
    with pytest.raises(ValueError, match="names must be a list"):
        with adapter_batch(model, "task_b"):
            pass
    with adapter_batch(model, ["task_b", None]):
        with pytest.raises(ValueError, match="cannot be opened while another"):
            with disable_adapter(model):
                pass
    set_adapter(model, "task_b")  # its λ's are trainable now
    with adapter_batch(model, ["task_b", None]):
        with pytest.raises(ValueError, match=r"adapters \['task_b'\] have trainable λ's and autograd is recording"):
            model(input_ids=ids)
        with torch.no_grad():
            model(input_ids=ids)
    with torch.inference_mode(), adapter_batch(model, ["task_b", None]):
        model(input_ids=ids)
    merge_vera(model)
    with pytest.raises(ValueError, match=r"adapter_batch: layers .* are merged"):
        with adapter_batch(model, ["task_b", None]):
            pass
    assert find_adapter(model).forced_path is None
