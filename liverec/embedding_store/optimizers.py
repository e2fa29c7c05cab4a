"""Sparse (row-wise) optimizers: each row carries its own state and is updated only when touched.

A dense optimizer would sweep every row each step; with millions of rows and a few thousand
touched per batch, the sweep is the whole cost. Here an update reads and writes only the given
rows, which the caller has already deduplicated (duplicate keys' gradients summed), so a row is
updated at most once per step whatever its multiplicity in the batch.

Adam keeps a per-row step count for its bias correction ("lazy" Adam): a row seen rarely is
corrected for its own number of updates, not the global step, which is what sparse rows need.
State is always float32, whatever the weights' dtype; the arithmetic is done in float32 too.
"""

from __future__ import annotations

import torch

from liverec.embedding_store.config import TableConfig


def state_columns(config: TableConfig) -> dict[str, int]:
    """Name -> columns of each per-row float32 state tensor of `config`'s optimizer."""
    if config.optimizer == "adagrad":
        return {"accumulator": config.dim}
    if config.optimizer == "adam":
        return {"exp_avg": config.dim, "exp_avg_sq": config.dim, "step": 1}
    return {}


def initial_value(config: TableConfig, name: str) -> float:
    """What state `name` of a new row starts at (zero; Adagrad's accumulator at adagrad_init)."""
    return config.adagrad_init if name == "accumulator" else 0.0


def initial_state(config: TableConfig, name: str, rows: int, device: torch.device) -> torch.Tensor:
    """Fresh state `name` for `rows` new rows."""
    return torch.full((rows, state_columns(config)[name]), initial_value(config, name), dtype=torch.float32,
                      device=device)


def update(
    config: TableConfig, weights: torch.Tensor, state: dict[str, torch.Tensor], rows: torch.Tensor,
    grads: torch.Tensor,
) -> None:
    """Apply one step to `rows` (unique) with their summed float32 `grads`, in place."""
    if config.optimizer == "sgd":
        weights.index_add_(0, rows, grads.to(weights.dtype), alpha=-config.lr)
        return
    w = weights.index_select(0, rows).float()
    if config.optimizer == "adagrad":
        accumulator = state["accumulator"].index_select(0, rows).addcmul_(grads, grads)
        state["accumulator"].index_copy_(0, rows, accumulator)
        w.addcdiv_(grads, accumulator.sqrt_().add_(config.eps), value=-config.lr)
    else:
        step = state["step"].index_select(0, rows).add_(1.0)
        exp_avg = state["exp_avg"].index_select(0, rows).mul_(config.beta1).add_(grads, alpha=1.0 - config.beta1)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(config.beta2).addcmul_(
            grads, grads, value=1.0 - config.beta2
        )
        state["step"].index_copy_(0, rows, step)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        bias1 = 1.0 - torch.pow(config.beta1, step)
        bias2 = 1.0 - torch.pow(config.beta2, step)
        denom = exp_avg_sq.div_(bias2).sqrt_().add_(config.eps)
        w.addcdiv_(exp_avg.div_(bias1), denom, value=-config.lr)
    weights.index_copy_(0, rows, w.to(weights.dtype))
