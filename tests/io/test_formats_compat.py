"""Files written by vera-lightning 0.1.0 (before the restructure) still load and resume identically.

``tests/fixtures`` holds a slim Lightning ``.ckpt`` (epoch 0, step 4), an adapter directory and the
values the 0.1.0 code produced from them: the λ's after resuming for one more epoch and the adapted
model's logits. Regenerating these fixtures would defeat the test; they are never rewritten.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers.lightning import TinyOptModule, trainer_kwargs
from safetensors.torch import load_file

from vera_lightning import VeraCallback, load_adapter
from vera_lightning.core.lookup import vera_layers

pytestmark = pytest.mark.numerics  # trained values: compared under every ATEN_CPU_CAPABILITY

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
EXPECTED = load_file(str(FIXTURES / "expected_v0.1.0.safetensors"))


def test_slim_ckpt_from_0_1_0_resumes_to_the_same_lambdas(tmp_path):
    module = TinyOptModule(with_scheduler=True)
    trainer = pl.Trainer(callbacks=[VeraCallback(r=16, target_modules=["q_proj", "v_proj"])],
                         **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(module, ckpt_path=FIXTURES / "slim_v0.1.0_epoch0_step4.ckpt")
    assert trainer.global_step == 8
    got = {f"{n}.{k}": p.detach() for n, layer in vera_layers(module) for k, p in layer.adapter_params().items()}
    assert set(got) == set(EXPECTED) - {"adapter_logits", "input_ids"}
    for key, value in got.items():
        torch.testing.assert_close(value, EXPECTED[key], rtol=1e-5, atol=1e-6)  # same kernels: bit-equal


def test_adapter_dir_from_0_1_0_loads_to_the_same_outputs():
    module = TinyOptModule()
    model = load_adapter(module.model, FIXTURES / "adapter_v0.1.0").eval()
    with torch.no_grad():
        logits = model(input_ids=EXPECTED["input_ids"]).logits
    torch.testing.assert_close(logits, EXPECTED["adapter_logits"], rtol=1e-5, atol=1e-6)
