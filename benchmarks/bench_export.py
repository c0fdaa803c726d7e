"""The serving round trip of docs/export.md: an E2E SmolLM2 adapter exported, then run in llama.cpp.

Steps (each result is kept in ``--out`` and reused on a rerun, so an interrupted run resumes):

1. ``export``: ``format=merged``, ``gguf-lora`` and ``lora`` of ``--adapter`` (timed; SmolLM2 target < 30 s);
   the GGUF file's size against the exact LoRA's float32 ``lora_A``/``lora_B`` tensors (target <= 1.1x);
2. ``ours``: greedy generations for the 60 distinct E2E ``val.csv`` prompts from our model (the de-quantized
   base the app builds from the packaged GGUF, the adapter loaded), as ``scripts/eval.py`` decodes them
   (``max_new_tokens=64``, stop at a newline);
3. ``llama_cpp``: the same token ids through ``llama-cpp-python`` over the very same GGUF base file with the
   exported ``adapter-lora.gguf`` (greedy: temperature 0, no repetition penalty), and with no adapter
   (zero-shot, the evidence that the adapter is applied);
4. BLEU (sacreBLEU's, :mod:`vera_lightning.app.generation.textmetrics`) of each against all references, the
   count of generations identical to ours; ``results.json`` in ``--out``.

    python benchmarks/bench_export.py --adapter outputs/<run>/adapter --out /tmp/bench_export

Needs ``pip install -e .[export-test]`` (llama-cpp-python, built from source) for step 3.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _cached(path: Path, compute) -> Any:
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    value = compute()
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return value


def _run_config(adapter: Path, experiment: str):
    """The training run's composed config beside ``adapter``; else ``experiment=<experiment>`` composed afresh
    (an adapter kept away from its run, e.g. by ``bench_e2e.py --keep``)."""
    from omegaconf import OmegaConf

    recorded = adapter.parent / ".hydra" / "config.yaml"
    if recorded.is_file():
        return OmegaConf.load(recorded)
    from bench_app import compose

    print(f"[bench_export] no {recorded}: using experiment={experiment} as composed now", flush=True)
    return compose([f"experiment={experiment}"])


def step_export(adapter: Path, out: Path) -> dict:
    from safetensors import safe_open

    from vera_lightning.app.commands.export import export_run

    record = {}
    for fmt, target in (("merged", out / "merged"), ("gguf-lora", out / "adapter-lora.gguf"), ("lora", out / "lora")):
        result = export_run(adapter, fmt, target, overwrite=True)
        record[fmt] = {"seconds": result.seconds, "bytes": result.bytes, "rank": result.rank}
    with safe_open(str(out / "lora" / "adapter_model.safetensors"), "pt") as handle:
        lora_bytes = sum(handle.get_slice(k).get_shape()[0] * handle.get_slice(k).get_shape()[1] * 4
                         for k in handle.keys() if ".lora_A." in k or ".lora_B." in k)
    record["lora_float32_tensor_bytes"] = lora_bytes
    record["gguf_over_lora_float32"] = record["gguf-lora"]["bytes"] / lora_bytes
    return record


def _prompts(cfg) -> tuple[list[dict], Any]:
    from omegaconf import OmegaConf

    from vera_lightning.app.data import sft, sft_rows
    from vera_lightning.app.models.load import build_tokenizer

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg["data_dir"] = str((ROOT / data_cfg["data_dir"]).resolve()) if not os.path.isabs(
        data_cfg["data_dir"]) else data_cfg["data_dir"]
    tokenizer = build_tokenizer(OmegaConf.to_container(cfg.model, resolve=True))
    rows = sft_rows.read_rows(Path(data_cfg["data_dir"]) / data_cfg["val_file"], data_cfg)
    items = sft.prompt_references(rows, data_cfg, tokenizer)
    for item in items:
        item["ids"] = sft.prompt_token_ids(data_cfg, tokenizer, item["prompt"])
    return items, tokenizer


def step_ours(adapter: Path, cfg) -> list[str]:
    import torch
    from omegaconf import OmegaConf

    from vera_lightning import load_adapter
    from vera_lightning.app.generation.generate import GenerateSettings, generate_texts
    from vera_lightning.app.models.load import build_model

    items, tokenizer = _prompts(cfg)
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True), tokenizer)
    load_adapter(model, adapter)
    settings = GenerateSettings(max_new_tokens=64, stop_at_newline=True, batch_size=16, progress=False)
    ids = {item["prompt"]: item["ids"] for item in items}
    with torch.inference_mode():
        return list(generate_texts(model.eval(), tokenizer, [i["prompt"] for i in items], settings,
                                   encode=lambda p: ids[p]))


def step_llama_cpp(cfg, lora: Path | None) -> list[str]:
    from llama_cpp import Llama

    from vera_lightning.app.models.gguf_cache import gguf_source

    items, tokenizer = _prompts(cfg)
    kwargs = {"lora_path": str(lora), "lora_scale": 1.0} if lora else {}
    llm = Llama(model_path=str(gguf_source(cfg.model.name_or_path)), n_ctx=512, n_threads=os.cpu_count() or 2,
                verbose=False, seed=0, **kwargs)
    texts = []
    for item in items:
        done = llm.create_completion(item["ids"], max_tokens=64, temperature=0.0, top_k=1, repeat_penalty=1.0,
                                     frequency_penalty=0.0, presence_penalty=0.0, stop=["\n"])
        texts.append(done["choices"][0]["text"].split("\n", 1)[0].strip())
        llm.reset()
    return texts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, required=True, help="a training run's adapter/ (E2E SmolLM2)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_export"))
    parser.add_argument("--experiment", default="e2e_smollm2",
                        help="the recipe's config when the adapter is not inside its training run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = _run_config(args.adapter, args.experiment)
    exported = _cached(args.out / "export.json", lambda: step_export(args.adapter, args.out))
    ours = _cached(args.out / "ours.json", lambda: step_ours(args.adapter, cfg))
    start = time.perf_counter()
    theirs = _cached(args.out / "llama_cpp.json", lambda: step_llama_cpp(cfg, args.out / "adapter-lora.gguf"))
    llama_s = time.perf_counter() - start
    zero = _cached(args.out / "llama_cpp_zero_shot.json", lambda: step_llama_cpp(cfg, None))

    from vera_lightning.app.generation.textmetrics import score_generations

    items, _ = _prompts(cfg)
    refs = [item["references"] for item in items]
    results = {
        "export": exported,
        "bleu_ours": score_generations([t.strip() for t in ours], refs)["bleu"],
        "bleu_llama_cpp": score_generations(theirs, refs)["bleu"],
        "bleu_llama_cpp_zero_shot": score_generations(zero, refs)["bleu"],
        "identical": sum(a.strip() == b.strip() for a, b in zip(ours, theirs)), "prompts": len(items),
        "llama_cpp_seconds": round(llama_s, 1),
    }
    results["bleu_gap"] = abs(results["bleu_ours"] - results["bleu_llama_cpp"])
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
