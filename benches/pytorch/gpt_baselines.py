"""PyTorch baselines for autopar's GPU benchmark: the same GPT-2 as autopar's built-in (pre-norm,
gelu_tanh MLP, learned positions, tied head), bf16 autocast compute with fp32 weights and AdamW
state, synthetic tokens, one training step per iteration. Launch with torchrun:

    torchrun --nproc-per-node 2 benches/pytorch/gpt_baselines.py --mode ddp --layers 24 \
        --hidden 1024 --heads 16 --batch 8 --seq 1024 [--compile]

--mode ddp | fsdp2 | tp (DTensor Megatron-style: q/k/v and fc column-wise, out and proj
row-wise). --batch is the global batch. Rank 0 prints one JSON object.
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(h)
        self.q, self.k, self.v = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.o = nn.Linear(h, h)
        self.ln_2 = nn.LayerNorm(h)
        self.fc = nn.Linear(h, 4 * h)
        self.proj = nn.Linear(4 * h, h)

    def forward(self, x):
        b, s, _ = x.shape
        y = self.ln_1(x)
        q, k, v = (t(y).view(b, s, -1, x.shape[-1] // self.heads).transpose(1, 2)
                   for t in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, layers, h, heads, vocab, seq):
        super().__init__()
        self.wte = nn.Embedding(vocab, h)
        self.wpe = nn.Embedding(seq, h)
        self.h = nn.ModuleList(Block(h, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(h)

    def forward(self, ids, labels):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for blk in self.h:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="ddp", choices=["ddp", "fsdp2", "tp"])
    p.add_argument("--compile", action="store_true")
    for k, d in [("layers", 24), ("hidden", 1024), ("heads", 16), ("vocab", 50257),
                 ("batch", 8), ("seq", 1024), ("steps", 10), ("warmup", 3)]:
        p.add_argument(f"--{k}", type=int, default=d)
    a = p.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    torch.manual_seed(0)
    model = GPT(a.layers, a.hidden, a.heads, a.vocab, a.seq).cuda()
    n_params = sum(t.numel() for t in model.parameters())
    local_batch = a.batch
    if a.mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
        local_batch = a.batch // world
    elif a.mode == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for blk in model.h:
            fully_shard(blk, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        local_batch = a.batch // world
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                       parallelize_module)
        mesh = init_device_mesh("cuda", (world,))
        plan = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(),
                "o": RowwiseParallel(), "fc": ColwiseParallel(), "proj": RowwiseParallel()}
        for blk in model.h:
            parallelize_module(blk, mesh, plan)
    if a.compile:
        model = torch.compile(model)
    # DTensor and plain parameters cannot share a foreach kernel
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                            foreach=a.mode != "tp")
    g = torch.Generator(device="cuda").manual_seed(rank if a.mode != "tp" else 0)
    ids = torch.randint(0, a.vocab, (local_batch, a.seq), device="cuda", generator=g)
    labels = torch.randint(0, a.vocab, (local_batch, a.seq), device="cuda", generator=g)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.mode != "fsdp2"):
            loss = model(ids, labels)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tokens = a.batch * a.seq
    # 6 N T plus attention (12 L s h per token), against the bf16 dense peak of the GPU
    flops = 6 * n_params * tokens + 12 * a.layers * a.seq * a.hidden * tokens
    peak = {"H100": 989e12, "H200": 989e12}.get(torch.cuda.get_device_name().split()[1], 989e12)
    if rank == 0:
        print(json.dumps({
            "framework": f"pytorch {torch.__version__}", "mode": a.mode, "compile": a.compile,
            "gpus": world, "params": n_params, "global_batch": a.batch, "seq": a.seq,
            "step_s": step, "tokens_per_s": tokens / step,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(),
            "mfu": flops / step / (peak * world),
        }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
