"""Worker functions for the 2-process (gloo) tests; importable so ``mp.spawn`` can pickle them."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch import nn

from vera_lightning import VeraConfig, apply_vera
from vera_lightning.core.lookup import vera_layers
from vera_lightning.training.distributed import broadcast_projections, exclude_projections_from_ddp


def finish(path: str, result: dict) -> None:
    """Write ``result`` and leave without running destructors.

    A Python DDP comm hook (``allreduce_hook`` uses ``fut.then(<Python callable>)``) can deadlock a
    process at exit: the Reducer's destructor holds the GIL while joining gloo's threads, and a gloo
    thread may still need the GIL to drop that callable. The barrier lets those threads finish
    (the GIL is released while waiting); ``os._exit`` then skips the teardown altogether.
    """
    with open(path, "w") as fh:
        json.dump(result, fh)
        fh.flush()
        os.fsync(fh.fileno())
    dist.barrier()
    os._exit(0)


def init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


class BNNet(nn.Module):
    """Adapted linears around a BatchNorm, whose running stats DDP must keep syncing."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def global_batch(step: int, world: int, per_rank: int = 4):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(world * per_rank, 16, generator=g), torch.randn(world * per_rank, 8, generator=g)


def build_bnnet(seed: int, r: int = 64):
    torch.manual_seed(0)  # same base weights everywhere (as loading a pretrained model gives)
    model = BNNet()
    torch.manual_seed(seed)  # ranks' RNG differ from here on
    apply_vera(model, VeraConfig(r=r, target_modules=["fc1", "fc2"], init_weights=False))
    with torch.no_grad():  # same λ's on every rank (DDP would broadcast them anyway)
        g = torch.Generator().manual_seed(7)
        for _, layer in vera_layers(model):
            for p in layer.adapter_params().values():
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def ddp_bytes_worker(rank: int, world: int, port: int, out_dir: str, ignore: bool, steps: int) -> None:
    import torch.nn.parallel.distributed as ddp_module
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    init(rank, world, port)
    model = build_bnnet(seed=rank)
    if rank == 1:
        with torch.no_grad():
            model.vera_projections.vera_A.mul_(-3.0)  # deliberately different before the broadcast
    differed = not _same_across_ranks(model.vera_projections.vera_A)
    broadcast_projections(model)
    same_after = _same_across_ranks(model.vera_projections.vera_A) and _same_across_ranks(model.vera_projections.vera_B)
    if ignore:
        exclude_projections_from_ddp(model)

    counts = {"broadcast": 0, "allreduce": 0}
    real_broadcast = ddp_module.dist._broadcast_coalesced

    def counting_broadcast(group, tensors, *args, **kwargs):
        counts["broadcast"] += sum(t.numel() * t.element_size() for t in tensors)
        return real_broadcast(group, tensors, *args, **kwargs)

    def counting_allreduce(state, bucket):
        counts["allreduce"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(None, bucket)

    ddp_module.dist._broadcast_coalesced = counting_broadcast
    try:
        wrapped = DDP(model, broadcast_buffers=True)
        wrapped.register_comm_hook(None, counting_allreduce)
        startup = dict(counts)
        counts.update(broadcast=0, allreduce=0)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        per_step = []
        for step in range(steps):
            x, y = global_batch(step, world)
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            counts.update(broadcast=0, allreduce=0)
            loss = nn.functional.mse_loss(wrapped(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            per_step.append(dict(counts))
    finally:
        ddp_module.dist._broadcast_coalesced = real_broadcast
    lambdas = {n: p.detach().tolist() for n, p in model.named_parameters() if "vera_lambda" in n}
    result = {
        "differed_before": differed, "same_after_broadcast": same_after, "startup": startup,
        "per_step": per_step, "lambdas": lambdas,
        "trainable_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
        "projection_bytes": sum(b.numel() * b.element_size()
                                for b in (model.vera_projections.vera_A, model.vera_projections.vera_B)),
        "bn_buffer_bytes": sum(b.numel() * b.element_size() for b in model.bn.buffers()),
    }
    finish(os.path.join(out_dir, f"rank{rank}.json"), result)


def _same_across_ranks(t: torch.Tensor) -> bool:
    gathered = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def single_process_bnnet_lambdas(steps: int, world: int) -> dict:
    model = build_bnnet(seed=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(steps):
        x, y = global_batch(step, world)
        # DDP averages per-rank mean losses: identical to the mean over the global batch,
        # except BatchNorm, which normalises per rank; run each half in its own BN call.
        outs = [model(xi) for xi in x.chunk(world)]
        loss = sum(nn.functional.mse_loss(o, yi) for o, yi in zip(outs, y.chunk(world))) / world
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().tolist() for n, p in model.named_parameters() if "vera_lambda" in n}


def tiny_opt_model(dtype=torch.float32):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0)
    model = OPTForCausalLM(cfg)
    apply_vera(model, VeraConfig(r=16, target_modules=["q_proj", "v_proj", "fc1"], init_weights=False))
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for _, layer in vera_layers(model):
            for p in layer.adapter_params().values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(dtype) if dtype != torch.float32 else model


def opt_batch(world: int, per_rank: int = 2):
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 96, (world * per_rank, 9), generator=g)


def fsdp2_worker(rank: int, world: int, port: int, out_dir: str, bf16: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    init(rank, world, port)
    model = tiny_opt_model()
    broadcast_projections(model)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mp_policy": policy} if policy else {}
    for layer in model.model.decoder.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    ids = opt_batch(world).chunk(world)[rank]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if "vera_lambda" in name:
            grads[name] = p.grad.full_tensor().float().tolist()
    projections_plain = all(not hasattr(b, "full_tensor") for b in model.vera_projections.buffers())
    finish(os.path.join(out_dir, f"rank{rank}.json"),
           {"grads": grads, "loss": float(loss), "projections_plain": projections_plain})


def single_process_opt_grads(world: int, bf16: bool) -> dict:
    # with bf16, what FSDP2's param policy computes with: every parameter (λ's too) in bf16
    model = tiny_opt_model(torch.bfloat16 if bf16 else torch.float32)
    for ids in opt_batch(world).chunk(world):
        loss = model(input_ids=ids, labels=ids).loss / world
        loss.backward()
    return {n: p.grad.float().tolist() for n, p in model.named_parameters() if "vera_lambda" in n}
