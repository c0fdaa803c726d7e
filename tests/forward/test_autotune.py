"""Measured path choice (vera_lightning/forward/autotune.py): what it measures, remembers, refuses and costs.

Modules: vera_lightning/forward/probe.py, vera_lightning/forward/tune_settings.py.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import warnings

import pytest
import torch
from bench_harness import saved_activation_bytes
from helpers.models import tiny_llama, tiny_opt
from helpers.peft_oracle import peft_vera

from vera_lightning import VeraConfig, apply_vera, autotune_report, configure_autotune, record_paths, set_vera_path
from vera_lightning.core.lookup import vera_layers
from vera_lightning.forward import autotune, dispatch
from vera_lightning.forward.autotune import Tuner
from vera_lightning.forward.cost import Group, allowed_paths
from vera_lightning.forward.tune_cache import FORMAT, VERSION, Signature, bucket_tokens, machine_key


class FakeClock:
    """A clock that only moves when a (fake or wrapped) path run says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.now


def fake_runs(clock: FakeClock, seconds: dict[str, float], log: list | None = None):
    """``prepare(tokens) -> build() -> run(path)`` advancing ``clock`` by ``seconds[path]`` per run."""

    def prepare(tokens: int):
        def build():
            def run(path: str) -> None:
                if log is not None:
                    log.append((tokens, path))
                clock.now += seconds[path]
            return run
        return build

    return prepare


def group(n=2048, in_features=768, outs=(768, 768), r=1024, memory="lean", learned=True, grad_x=True):
    return Group(n, in_features, tuple(outs), r, torch.float32, torch.device("cpu"), memory, True, grad_x, learned)


@pytest.fixture
def tuner(tmp_path):
    clock = FakeClock()
    t = Tuner(timer=clock, prune=math.inf)
    t.settings.cache_set = tmp_path / "autotune.json"
    t.settings.budget_set = 100.0
    return t, clock


@pytest.fixture
def process_tuner(tmp_path):
    """The process's tuner on, with a fake clock and a cache file under tmp_path; restored afterwards."""
    clock = FakeClock()
    with configure_autotune(enabled=True, cache_file=tmp_path / "autotune.json", budget_s=100.0, timer=clock,
                            clear=True) as t:
        yield t, clock
    autotune.TUNER.clear()


def test_buckets_two_per_octave_so_nearby_token_counts_share_a_choice():
    assert [bucket_tokens(n) for n in (1, 2, 3, 5, 7, 512, 513, 700, 768, 769, 1000, 1024, 4096)] == [
        1, 2, 3, 6, 8, 512, 768, 768, 768, 1024, 1024, 1024, 4096]
    for n in range(1, 5000):
        assert n <= bucket_tokens(n) <= 1.5 * n  # never measured on a much larger shape than the real one


@pytest.mark.parametrize("seconds,expected", [({"lean": 1.0, "merged": 2.0}, "lean"),
                                              ({"lean": 2.0, "merged": 1.0}, "merged")])
def test_picks_the_faster_of_two_candidates(tuner, seconds, expected):
    t, clock = tuner
    runs = []
    assert t.choose(group(), fake_runs(clock, seconds, runs)) == expected
    assert {p for _, p in runs} == {"lean", "merged"}  # both measured
    choice = t.report()["choices"][Signature.of(group()).key()]
    assert choice["source"] == "measured" and choice["ms"][expected] == 1e3 * min(seconds.values())


@pytest.mark.parametrize("memory,admissible", [("lean", {"lean", "merged"}),
                                               ("speed", {"lean", "save_h", "merged", "plain"})])
def test_never_picks_a_path_the_memory_preference_forbids(tuner, memory, admissible):
    t, clock = tuner
    runs = []
    seconds = {"lean": 3.0, "save_h": 1.0, "merged": 2.0, "plain": 0.5}  # the memory-hungry ones are fastest
    picked = t.choose(group(n=512, memory=memory), fake_runs(clock, seconds, runs))
    assert {p for _, p in runs} == admissible  # a forbidden path is not even run
    assert picked == ("merged" if memory == "lean" else "plain")


def test_remembers_per_signature_and_does_not_time_again(tuner):
    t, clock = tuner
    runs = []
    prepare = fake_runs(clock, {"lean": 1.0, "merged": 1.2}, runs)
    assert t.choose(group(), prepare) == "lean"
    measured = len(runs)
    assert measured == 2 * (t.warmup + t.repeats) and {n for n, _ in runs} == {2048}
    calls = clock.calls
    assert t.choose(group(), prepare) == "lean"
    assert len(runs) == measured and clock.calls == calls  # remembered: nothing timed
    t.choose(group(outs=(768, 768, 768)), prepare)  # another group: measured
    t.choose(group(grad_x=False), prepare)  # grad mode is part of the signature
    assert len(runs) == 3 * measured


def test_nearby_token_counts_are_not_tuned_again(tuner):
    t, clock = tuner
    runs = []
    prepare = fake_runs(clock, {"lean": 1.0, "merged": 1.2}, runs)
    for n in (700, 730, 768, 600):  # dynamic padding: one bucket (768)
        t.choose(group(n=n), prepare)
    assert {n for n, _ in runs} == {768} and len(runs) == 2 * (t.warmup + t.repeats)
    t.choose(group(n=800), prepare)
    assert {n for n, _ in runs} == {768, 1024}


def test_a_candidate_far_behind_is_dropped_after_one_timed_round(tuner):
    t, clock = tuner
    runs = []
    assert t.choose(group(), fake_runs(clock, {"lean": 1.0, "merged": 1.6}, runs)) == "lean"
    assert [p for _, p in runs].count("merged") == t.warmup + 1
    assert [p for _, p in runs].count("lean") == t.warmup + t.repeats


def test_reuses_the_disk_cache_in_a_new_process(tuner, tmp_path):
    t, clock = tuner
    t.choose(group(), fake_runs(clock, {"lean": 1.0, "merged": 2.0}))
    doc = json.loads((tmp_path / "autotune.json").read_text())
    assert doc["format"] == FORMAT and doc["version"] == VERSION
    (section,) = doc["machines"].values()
    assert section[Signature.of(group()).key()]["path"] == "lean"

    fresh = Tuner(timer=FakeClock(), prune=math.inf)  # a new process: nothing in memory
    fresh.settings.cache_set = tmp_path / "autotune.json"

    def never(tokens):
        raise AssertionError("measured although the file holds the choice")

    assert fresh.choose(group(), never) == "lean"
    assert fresh.report()["choices"][Signature.of(group()).key()]["source"] == "disk"


def test_a_remembered_path_the_rules_no_longer_admit_is_measured_again(tuner, tmp_path):
    t, clock = tuner
    sig = Signature.of(group(n=512))
    machine = machine_key(torch.device("cpu"), sig.threads)
    (tmp_path / "autotune.json").write_text(json.dumps(
        {"format": FORMAT, "version": VERSION, "machines": {machine: {sig.key(): {"path": "plain", "ms": {}}}}}))
    runs = []
    assert t.choose(group(n=512), fake_runs(clock, {"lean": 2.0, "merged": 1.0}, runs)) == "merged"
    assert runs


@pytest.mark.parametrize("content", ["{not json", json.dumps({"some": "other tool's settings"}),
                                     json.dumps({"format": FORMAT, "version": VERSION + 1, "machines": {}}),
                                     json.dumps([1, 2, 3])])
def test_ignores_a_corrupt_or_foreign_cache_file_with_a_warning_and_never_overwrites_it(tuner, tmp_path, content):
    t, clock = tuner
    path = tmp_path / "autotune.json"
    path.write_text(content)
    with pytest.warns(RuntimeWarning, match="ignoring the cache file .*will not be written over"):
        assert t.choose(group(), fake_runs(clock, {"lean": 1.0, "merged": 2.0})) == "lean"
    assert path.read_text() == content
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every new shape
        t.choose(group(outs=(768,)), fake_runs(clock, {"lean": 1.0, "merged": 2.0}))
    assert path.read_text() == content
    assert [p.name for p in tmp_path.iterdir()] == ["autotune.json"]  # no temporary file left behind


def test_budget_is_respected_then_the_cost_model_decides(tuner, caplog):
    t, clock = tuner
    t.settings.budget_set = 2.5
    runs = []
    first = t.choose(group(), fake_runs(clock, {"lean": 1.0, "merged": 1.0}, runs))
    assert t.spent_s <= 2.5 and len(runs) == 2  # the warm-up round only: a third run would cross the budget
    assert first == group().best()  # nothing timed after warm-up: the cost model's choice
    with caplog.at_level(logging.WARNING, logger="vera_lightning.forward.autotune"):
        t.settings.budget_set = 0.0
        assert t.choose(group(n=8192), fake_runs(clock, {"lean": 0.1, "merged": 9.0}, runs)) == "merged"
    assert len(runs) == 2 and "budget" in caplog.text
    assert t.report()["choices"][Signature.of(group(n=8192)).key()]["source"] == "cost model (budget spent)"


def test_prunes_candidates_the_cost_model_calls_hopeless():
    t = Tuner(timer=FakeClock())
    assert t.candidates(group(n=8192)) == ["merged"]  # lean is estimated > 3x merged at N=8192, r=1024
    assert set(t.candidates(group(n=512))) == {"lean", "merged"}
    assert Tuner(timer=FakeClock()).choose(group(n=8192), lambda tokens: pytest.fail("one candidate: no timing")) \
        == "merged"


def _adapted_opt(r=512, targets=("q_proj", "v_proj")):
    torch.manual_seed(0)
    base = tiny_opt(hidden=64).train()
    return apply_vera(base, VeraConfig(r=r, target_modules=list(targets), init_weights=False))


@pytest.fixture
def slow_paths(monkeypatch):
    """``slow_paths(clock, seconds)``: every run of a path (probe or model) advances ``clock`` by ``seconds[path]``."""

    def install(clock: FakeClock, seconds: dict[str, float]) -> None:
        real = dispatch.apply_path

        def timed(layer, x, path):
            clock.now += seconds.get(path.value, 0.0)
            return real(layer, x, path)

        monkeypatch.setattr(dispatch, "apply_path", timed)

    return install


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    with record_paths() as seen:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    grads = {n: (l.vera_lambda_b.grad.clone(), l.vera_lambda_d.grad.clone()) for n, l in vera_layers(model)}
    return out.logits.detach(), grads, {p.value for p in seen.values()}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("seconds,tuned_path", [({"lean": 5.0, "merged": 1.0}, "merged"),
                                                 ({"lean": 1.0, "merged": 5.0}, "lean")])
def test_in_a_model_the_measured_path_is_taken_and_values_equal_tuning_off(process_tuner, slow_paths, seconds,
                                                                           tuned_path):
    _, clock = process_tuner
    slow_paths(clock, seconds)
    tuned = _adapted_opt()
    untuned = copy.deepcopy(tuned)
    ids = torch.randint(0, 96, (8, 64), generator=torch.Generator().manual_seed(0))
    with configure_autotune(enabled=False):
        model_paths = [_step(untuned, ids)[2] for _ in range(3)][-1]
        out_off, grads_off, _ = _step(untuned, ids)
    for _ in range(2):  # the first forward teaches each leader its siblings; the second tunes
        _step(tuned, ids)
    assert {c["source"] for c in autotune_report()["choices"].values()} == {"measured"}
    out_on, grads_on, taken = _step(tuned, ids)
    assert taken == {tuned_path} and model_paths == {"merged"}  # the cost model picks merged at N=512
    if taken == model_paths:
        assert torch.equal(out_on, out_off)  # same path: bitwise equal
    assert _rel(out_on, out_off) <= 1e-5
    for name, (gb, gd) in grads_on.items():
        assert _rel(gb, grads_off[name][0]) <= 1e-5 and _rel(gd, grads_off[name][1]) <= 1e-5, name


def test_turned_off_by_the_environment_variable_and_by_the_api(monkeypatch, tmp_path, slow_paths):
    clock = FakeClock()
    slow_paths(clock, {"lean": 1.0, "merged": 5.0})
    ids = torch.randint(0, 96, (8, 64), generator=torch.Generator().manual_seed(0))
    with configure_autotune(cache_file=tmp_path / "autotune.json", timer=clock, budget_s=1000.0, clear=True):
        monkeypatch.setenv("VERA_LIGHTNING_AUTOTUNE", "off")
        model = _adapted_opt()
        for _ in range(3):
            assert _step(model, ids)[2] == {"merged"}  # the cost model's choice
        assert autotune_report()["choices"] == {} and not autotune_report()["enabled"]
        monkeypatch.setenv("VERA_LIGHTNING_AUTOTUNE", "1")
        with configure_autotune(enabled=False):  # the API wins over the variable
            assert _step(model, ids)[2] == {"merged"} and autotune_report()["choices"] == {}
        assert _step(model, ids)[2] == {"lean"}  # back on: measured
        assert json.loads((tmp_path / "autotune.json").read_text())["machines"]
    autotune.TUNER.clear()


def test_lean_memory_holds_a_quarter_of_peft_at_every_token_count_even_when_hungry_paths_are_faster(
        process_tuner, slow_paths):
    """The issue's regime (r > in, q,v) scaled down; save_h and PEFT's graph are made the fastest."""
    _, clock = process_tuner
    slow_paths(clock, {"lean": 4.0, "merged": 3.0, "save_h": 1.0, "plain": 0.5})
    for batch, seq in [(1, 8), (4, 32), (8, 64)]:
        ids = torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        base = tiny_opt(hidden=64).train()
        floor, other = copy.deepcopy(base).requires_grad_(False), copy.deepcopy(base)
        ours = apply_vera(base, VeraConfig(r=128, target_modules=["q_proj", "v_proj"], init_weights=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft_vera(other, r=128, target_modules=["q_proj", "v_proj"])
        for model in (floor, ours, theirs):
            model.get_input_embeddings().weight.requires_grad_(True)
        for _ in range(2):
            taken = _step(ours, ids)[2]
        assert taken == {"merged"}  # the fastest admissible
        extra = saved_activation_bytes(floor, ids)
        ours_extra, peft_extra = saved_activation_bytes(ours, ids) - extra, saved_activation_bytes(theirs, ids) - extra
        assert 0 < ours_extra <= 0.25 * peft_extra, (batch * seq, ours_extra / peft_extra)


def test_lean_never_admits_peft_graph_nor_an_h_over_a_quarter_of_peft():
    # fc2-like (in 3072 > out 768): PEFT's h+u is smaller than x, yet x is what the base keeps already
    assert allowed_paths(512, 3072, [768], 1024, torch.float32, "lean") == ["lean", "merged"]
    assert allowed_paths(512, 3072, [768], 256, torch.float32, "lean") == ["lean", "save_h", "merged"]
    # a single narrow layer: h = r is no larger than x = in, but it is 0.57 of PEFT's h + u
    assert allowed_paths(512, 576, [192], 256, torch.float32, "lean") == ["lean", "merged"]
    assert allowed_paths(512, 576, [576, 192, 192], 256, torch.float32, "lean") == ["lean", "save_h", "merged"]


def test_measuring_inside_saved_tensor_hooks_and_checkpointing_leaks_nothing(process_tuner, slow_paths):
    """The probe runs in a worker thread: the caller's hooks (checkpointing, memory counters) never see it."""
    _, clock = process_tuner
    slow_paths(clock, {"lean": 1.0, "merged": 5.0, "save_h": 2.0})
    torch.manual_seed(0)
    base = tiny_llama().train()
    plain = copy.deepcopy(base)
    ours = apply_vera(base, VeraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
                                       init_weights=False))
    ref = set_vera_path(apply_vera(plain, VeraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj",
                                                                           "up_proj"], init_weights=False)), "lean")
    ref.load_state_dict(ours.state_dict())
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        out, grads, taken = _step(ours, ids)
    assert autotune_report()["choices"] and taken == {"lean"}
    out_ref, grads_ref, _ = _step(ref, ids)
    assert _rel(out, out_ref) <= 1e-5
    for name, (gb, gd) in grads.items():
        assert _rel(gb, grads_ref[name][0]) <= 1e-5 and _rel(gd, grads_ref[name][1]) <= 1e-5, name
    autotune.TUNER.clear()
    fresh = set_vera_path(copy.deepcopy(ref), "auto")
    counts = []
    for _ in range(3):  # learn the groups, measure (inside the hooks), then run on the remembered choice
        counted: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, c=counted: c.append(t.numel()) or t, lambda t: t):
            fresh(input_ids=ids).logits.sum().backward()
        counts.append(counted)
        if len(counts) == 2:
            assert autotune_report()["choices"]  # it did measure, inside the hooks
    assert counts[1] == counts[2]  # the same model's saved tensors, none of the probe's


def test_settings_from_the_environment(monkeypatch, tmp_path):
    from vera_lightning.forward.tune_settings import Settings

    for name in ("VERA_LIGHTNING_AUTOTUNE", "VERA_LIGHTNING_AUTOTUNE_CACHE", "VERA_LIGHTNING_AUTOTUNE_BUDGET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VERA_LIGHTNING_CACHE", str(tmp_path / "cache"))
    settings = Settings()
    assert settings.enabled() and settings.budget_s() == 30.0  # on by default
    assert settings.cache_file() == tmp_path / "cache" / "autotune.json"
    monkeypatch.setenv("VERA_LIGHTNING_AUTOTUNE_CACHE", "off")
    monkeypatch.setenv("VERA_LIGHTNING_AUTOTUNE", "False")
    monkeypatch.setenv("VERA_LIGHTNING_AUTOTUNE_BUDGET", "2.5")
    assert settings.cache_file() is None and not settings.enabled() and settings.budget_s() == 2.5
    monkeypatch.setenv("VERA_LIGHTNING_AUTOTUNE_CACHE", str(tmp_path / "mine.json"))
    assert settings.cache_file() == tmp_path / "mine.json"
    monkeypatch.setenv("VERA_LIGHTNING_AUTOTUNE", "maybe")
    with pytest.warns(UserWarning, match="VERA_LIGHTNING_AUTOTUNE='maybe'"):
        assert settings.enabled()
    assert Settings(enabled_set=True, cache_set=None, budget_set=1.0).cache_file() is None


def test_a_failing_measurement_warns_and_falls_back_to_the_cost_model(tuner):
    t, _ = tuner

    def prepare(tokens):
        def build():
            raise RuntimeError("out of memory (simulated)")
        return build

    with pytest.warns(RuntimeWarning, match="measuring .* failed .*out of memory"):
        assert t.choose(group(), prepare) == group().best()
    assert t.report()["choices"][Signature.of(group()).key()]["source"] == "cost model (measurement failed)"
    assert t.choose(group(), prepare) == group().best()  # remembered: not retried every step


def test_checkpointing_replays_the_path_each_leader_took_in_its_forward(process_tuner, slow_paths):
    """A leader's recomputation takes its own forward's path, even if its signature was measured since."""
    from torch.utils.checkpoint import checkpoint

    _, clock = process_tuner
    slow_paths(clock, {"lean": 1.0, "save_h": 5.0, "merged": 5.0})
    torch.manual_seed(0)
    net = apply_vera(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)),
                     VeraConfig(r=16, target_modules=["0", "1"], init_weights=False))
    x = torch.randn(32, 64, requires_grad=True)
    first, second = net[0], net[1]
    model_pick = Group(32, 64, (64,), 16, torch.float32, torch.device("cpu"), "lean", True, True, True).best()
    assert model_pick != "lean"
    second(torch.randn(32, 64, requires_grad=True)).sum().backward()  # second has led once: it has no siblings
    with record_paths() as seen:
        out = checkpoint(lambda t: second(first(t)), x, use_reentrant=False)  # first: cost model; second: measured
        out.sum().backward()  # the recomputation must not take the newly measured "lean" for the first layer
    assert seen[first] == model_pick and seen[second] == "lean"
    assert first.vera_lambda_d.grad is not None and x.grad is not None
