"""PyTorch eager baseline for `autopar run` on the CPU: the same GPT-2 as autopar's built-in
(pre-norm blocks, gelu_tanh MLP, learned positions, head tied to the token embedding), the same
sizes, synthetic tokens, one AdamW training step per iteration, timed after warm-up.

    python benches/pytorch/gpt2_cpu_step.py --layers 4 --hidden 256 --heads 4 --ffn 1024 \
        --vocab 8192 --batch 8 --seq 128 --steps 10 --threads 2

Prints one JSON object (median and mean step seconds, tokens/s).
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, h, heads, ffn):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(h, eps=1e-5)
        self.c_attn = nn.Linear(h, 3 * h)
        self.c_proj = nn.Linear(h, h)
        self.ln_2 = nn.LayerNorm(h, eps=1e-5)
        self.c_fc = nn.Linear(h, ffn)
        self.mlp_proj = nn.Linear(ffn, h)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=2)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / (h // self.heads) ** 0.5
        mask = torch.ones(s, s, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, h)
        x = x + self.c_proj(a)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, layers, h, heads, ffn, vocab, positions):
        super().__init__()
        self.wte = nn.Embedding(vocab, h)
        self.wpe = nn.Embedding(positions, h)
        self.h = nn.ModuleList(Block(h, heads, ffn) for _ in range(layers))
        self.ln_f = nn.LayerNorm(h, eps=1e-5)

    def forward(self, ids, labels):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for blk in self.h:
            x = blk(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def main():
    p = argparse.ArgumentParser()
    for k, d in [("layers", 4), ("hidden", 256), ("heads", 4), ("ffn", 1024), ("vocab", 8192),
                 ("batch", 8), ("seq", 128), ("steps", 10), ("warmup", 2), ("threads", 2)]:
        p.add_argument(f"--{k}", type=int, default=d)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = GPT2(a.layers, a.hidden, a.heads, a.ffn, a.vocab, a.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))
    labels = torch.randint(0, a.vocab, (a.batch, a.seq))
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= a.warmup:
            times.append(dt)
    tokens = a.batch * a.seq
    print(json.dumps({
        "framework": f"pytorch {torch.__version__} eager",
        "threads": a.threads,
        "params": sum(t.numel() for t in model.parameters()),
        "median_step_s": statistics.median(times),
        "mean_step_s": statistics.mean(times),
        "tokens_per_s": tokens / statistics.median(times),
        "first_loss": losses[0],
    }))


if __name__ == "__main__":
    main()
