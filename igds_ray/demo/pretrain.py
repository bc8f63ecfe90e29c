"""Pretrain the demo's tiny Llama from scratch on a seeded document stream (plain PyTorch, in process).

The model is small enough (~0.3M parameters) that one process on 2 CPU cores trains it in a minute
or two; documents are packed into fixed-length sequences separated by EOS, as LM pretraining does.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch


def packed_batches(tok: Any, docs: Iterator[str], batch: int, seq_len: int) -> Iterator[torch.Tensor]:
    """[batch, seq_len] token ids: documents (BOS ... EOS) concatenated and cut into rows."""
    buf: list[int] = []
    need = batch * seq_len
    while True:
        while len(buf) < need:
            buf.extend(tok(next(docs)).input_ids)
            buf.append(tok.eos_token_id)
        yield torch.tensor(buf[:need]).view(batch, seq_len)
        buf = buf[need:]


def pretrain(model: torch.nn.Module, tok: Any, docs: Iterator[str], steps: int, batch: int = 48, seq_len: int = 64,
             lr: float = 3e-3, warmup: int = 50, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """AdamW with warmup + cosine decay; returns loss/throughput stats. Trains `model` in place."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))

    def schedule(s: int) -> float:
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    batches = packed_batches(tok, docs, batch, seq_len)
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(steps), desc="[world] pretraining the base model", disable=not progress, unit="step",
               mininterval=2.0)
    for _ in bar:
        x = next(batches)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if len(losses) % 25 == 0:
            bar.set_postfix(loss=f"{sum(losses[-25:]) / 25:.3f}")
    model.eval()
    wall = time.perf_counter() - t0
    tail = losses[-min(25, len(losses)):]
    return {"steps": steps, "tokens": steps * batch * seq_len, "wall_s": round(wall, 1),
            "tokens_per_s": round(steps * batch * seq_len / wall), "loss_first": round(losses[0], 4),
            "loss_last": round(sum(tail) / len(tail), 4)}


def save(model: torch.nn.Module, tok: Any, out: Path) -> Path:
    out = Path(out)
    model.save_pretrained(out)  # safetensors
    tok.save_pretrained(out)
    return out
