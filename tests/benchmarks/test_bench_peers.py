"""benchmarks/bench_peers.py: its records file (resume, refusal), TRL's batches against ours, and a 2-step smoke run
of the whole benchmark on a tiny random LLaMA (no hub)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import bench_peers
import pytest
import torch
from helpers.llm import byte_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
LLAMA = "{model_type:llama,hidden_size:32,intermediate_size:64,num_hidden_layers:2,num_attention_heads:4," \
        "num_key_value_heads:2,max_position_embeddings:256}"
ROWS = [("name[The Eagle], food[French]", "The Eagle serves French food."),
        ("name[Zizzi], area[riverside]", "Zizzi is by the riverside."),
        ("name[Aromi]", "Aromi is a restaurant."),
        ("name[The Mill], food[Indian], area[city centre]", "The Mill serves Indian food in the city centre."),
        ("name[Cotto]", "Cotto."),
        ("name[Alimentum], food[Chinese]", "Alimentum is a Chinese place."),
        ("name[Aromi], food[Italian]", "Aromi serves Italian food."),
        ("name[The Eagle]", "The Eagle.")]


@pytest.fixture
def tiny(tmp_path):
    """``(data_dir, overrides)``: E2E-like CSVs and the overrides that swap SmolLM2 for a tiny random LLaMA."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.csv", "val.csv"):
        (data / name).write_text("mr,ref\n" + "".join(f'"{mr}",{ref}\n' for mr, ref in ROWS), encoding="utf-8")
    byte_bpe_tokenizer(chat=True).save_pretrained(tmp_path / "tok")
    return data, [f"model.from_config={LLAMA}", f"model.tokenizer={tmp_path / 'tok'}", "data.batch_size=2",
                  "generate.max_new_tokens=4", "vera.r=8"]


def _measured(spec: dict) -> dict:
    return {"train_s": 2.0 if spec["method"] == "ours" else 4.0, "fit_s": 3.0, "tokens": 100, "padded_tokens": 120,
            "tokens_per_s": 50.0, "steps_done": spec["steps"], "peak_rss_train_bytes": 2**30,
            "peak_rss_bytes": 2**30, "scores": {"bleu": 50.0} if spec["bleu"] else None, "cpu_flags": [],
            "torch_threads": 1, "loadavg_before": "0 0 0", "loadavg_after": "0 0 0", "versions": {}}


def test_rerun_runs_only_the_missing_runs_and_refuses_a_foreign_or_corrupt_file(tmp_path, monkeypatch):
    ran = []

    def fake_run(cmd, **kwargs):
        spec = json.loads(cmd[cmd.index("--one") + 1])
        ran.append((spec["method"], spec["precision"], spec["bleu"]))
        return SimpleNamespace(returncode=0, stdout=json.dumps(_measured(spec)) + "\n", stderr="")

    monkeypatch.setattr(bench_peers.subprocess, "run", fake_run)
    monkeypatch.setattr(bench_peers, "missing_bench_packages", lambda: [])
    (tmp_path / "train.csv").write_text("mr,ref\n")
    base = ["--out", str(tmp_path / "out"), "--data-dir", str(tmp_path), "--steps", "2"]

    def invoke(*extra: str) -> list[dict]:
        args = bench_peers.parse([*base, *extra])
        return bench_peers.orchestrate(args, bench_peers.preflight(args))

    invoke("--methods", "ours", "--precisions", "float32")
    assert ran == [("ours", "float32", False)]
    records = invoke("--methods", "ours", "trl_vera", "--precisions", "float32")
    assert ran[1:] == [("trl_vera", "float32", False)]  # ours was recorded: not run again
    assert [r["method"] for r in records] == ["ours", "trl_vera"]
    invoke("--methods", "ours", "--precisions", "float32", "--bleu")  # BLEU asked: the record without it is redone
    invoke("--methods", "ours", "--precisions", "float32")  # a record with BLEU answers a run without it
    assert ran[2:] == [("ours", "float32", True)]
    invoke("--methods", "ours", "--precisions", "float32", "--steps", "3")  # another recipe: another run
    assert ran[3:] == [("ours", "float32", False)]
    runs = tmp_path / "out" / "runs.jsonl"
    lines = runs.read_text().splitlines()
    assert len(lines) == 4 and not list((tmp_path / "out").glob(".*partial"))
    table = bench_peers.render(records)
    assert "| 0.50 |" in table  # ours 2 s ÷ TRL VeRA 4 s

    runs.write_text("\n".join(lines) + '\n{"kind": "bench_e2e"}\n')
    with pytest.raises(SystemExit, match=f"{runs}: line 5 is not a bench_peers record"):
        invoke("--methods", "ours", "--precisions", "float32")
    runs.write_text(lines[0] + "\n" + lines[1][:40] + "\n")  # a cut line
    with pytest.raises(SystemExit, match=f"{runs}: line 2 is not JSON"):
        invoke("--methods", "ours", "--precisions", "float32")
    assert len(ran) == 4  # nothing ran after a refusal


@pytest.mark.slow
def test_trl_sees_our_batches_and_padding_free_gives_the_padded_loss(tiny, tmp_path):
    pytest.importorskip("trl", reason="TRL is the bench extra (pip install -e '.[bench]')")
    import bench_peers_run as run

    data, overrides = tiny
    spec = {"method": "trl_vera", "precision": "float32", "seed": 3, "steps": 3, "data_dir": str(data),
            "overrides": overrides, "lora_lr": 1e-3, "padding_free": False}
    cfg = run.recipe(spec, str(tmp_path / "work"))
    tokenizer, items, batches = run.batch_order(cfg, spec["steps"])
    assert len({i for b in batches for i in b}) == 6 and {len(b) for b in batches} == {2}  # 3 batches, 6 rows
    trainer = run.trl_trainer(spec, cfg, tokenizer, items, batches, str(tmp_path / "trl"))
    free = run.trl_trainer({**spec, "padding_free": True}, cfg, tokenizer, items, batches, str(tmp_path / "free"))
    for batch, theirs, packed in zip(batches, trainer.get_train_dataloader(), free.get_train_dataloader()):
        width = max(len(items[i]["input_ids"]) for i in batch)
        for row, i in enumerate(batch):
            n = len(items[i]["input_ids"])
            assert theirs["input_ids"][row, :n].tolist() == items[i]["input_ids"]
            assert theirs["labels"][row, :n].tolist() == items[i]["labels"]  # -100 on the prompt, as ours
            assert theirs["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
            assert (theirs["labels"][row, n:] == -100).all()
        with torch.no_grad():  # λ_b starts at 0: the loss is the base model's, padded or packed
            padded = trainer.model(**theirs).loss
            flat = free.model(**{k: v for k, v in packed.items() if k != "seq_lengths"}).loss
        torch.testing.assert_close(flat, padded, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_step_smoke_run_records_ours_and_trl_with_bleu(tiny, tmp_path):
    data, overrides = tiny
    methods = ["ours"]
    try:
        import trl  # noqa: F401

        methods.append("trl_vera")
    except ImportError:
        pass
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_peers.py"), "--steps", "2", "--methods", *methods,
           "--precisions", "float32", "--threads", "1", "--bleu", "--out", str(out), "--data-dir", str(data),
           "--override", *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == methods
    assert {r["tokens"] for r in records} == {records[0]["tokens"]} and records[0]["tokens"] > 0  # the same rows
    for r in records:
        assert r["steps_done"] == 2 and r["train_s"] > 0 and r["peak_rss_bytes"] > 2**20
        assert r["scores"]["prompts"] == len(ROWS) and 0 <= r["scores"]["bleu"] <= 100
        assert r["torch_threads"] == 1 and isinstance(r["cpu_flags"], list) and r["loadavg_before"]
    assert "| ours (app, VeRA r=256 q,v) | float32 | 1 |" in (out / "peers.md").read_text()
