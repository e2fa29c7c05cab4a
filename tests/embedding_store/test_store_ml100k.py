"""A matrix-factorisation model whose embeddings live in the store learns MovieLens-100k.

Ratings are replayed in event-time order, as the online trainer would see them: each batch is
looked up in train mode at its event time, the loss is backpropagated through the store's
embeddings, and the sparse rows get their optimizer step while a dense global bias trains with a
plain torch optimizer. The training loss must fall, and the model must beat the global-mean
predictor on the last 10% of events (a time split, so it has to generalise forward in time).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from liverec.embedding_store import EmbeddingStore, StoreEmbedding, TableConfig

DATA = Path(os.environ.get("LIVEREC_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data"))
INTER = DATA / "ml-100k" / "ml-100k.inter"
BATCH = 1024


def _ratings() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    table = np.loadtxt(INTER, delimiter="\t", skiprows=1, dtype=np.float64)
    order = np.argsort(table[:, 3], kind="stable")
    table = table[order]
    return table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 2], table[:, 3].astype(np.int64)


class MatrixFactorisation(nn.Module):
    def __init__(self, store: EmbeddingStore, mean: float) -> None:
        super().__init__()
        self.embeddings = StoreEmbedding(store)
        self.bias = nn.Parameter(torch.tensor(mean))

    def forward(self, users: torch.Tensor, items: torch.Tensor, now_s: int | None = None) -> torch.Tensor:
        out = self.embeddings({"user": users, "item": items, "user_bias": users, "item_bias": items}, now_s=now_s)
        dot = (out["user"] * out["item"]).sum(dim=1)
        return self.bias + dot + out["user_bias"][:, 0] + out["item_bias"][:, 0]


def test_matrix_factorisation_on_the_store_learns_movielens() -> None:
    users, items, ratings, times = _ratings()
    split = int(0.9 * len(ratings))
    store = EmbeddingStore([
        TableConfig("user", 16, optimizer="adagrad", lr=0.05, init_scale=0.1),
        TableConfig("item", 16, optimizer="adagrad", lr=0.05, init_scale=0.1),
        TableConfig("user_bias", 1, optimizer="adagrad", lr=0.05, initializer="zeros"),
        TableConfig("item_bias", 1, optimizer="adagrad", lr=0.05, initializer="zeros"),
    ], seed=0)
    mean = float(ratings[:split].mean())
    model = MatrixFactorisation(store, mean)
    dense = torch.optim.SGD([model.bias], lr=0.01)
    epoch_losses = []
    for _ in range(3):
        losses = []
        for start in range(0, split, BATCH):
            stop = min(start + BATCH, split)
            u, i = torch.from_numpy(users[start:stop]), torch.from_numpy(items[start:stop])
            target = torch.from_numpy(ratings[start:stop]).float()
            loss = nn.functional.mse_loss(model(u, i, now_s=int(times[stop - 1])), target)
            dense.zero_grad()
            loss.backward()
            dense.step()
            assert model.embeddings.apply_gradients() == 0
            losses.append(loss.item())
        epoch_losses.append(losses)
    first, last = np.mean(epoch_losses[0][:10]), np.mean(epoch_losses[-1])
    assert last < 0.85 * first, f"training loss went from {first:.3f} to {last:.3f}"
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(users[split:]), torch.from_numpy(items[split:]))
    test_mse = float(((predicted.numpy() - ratings[split:]) ** 2).mean())
    baseline = float(((mean - ratings[split:]) ** 2).mean())
    assert test_mse < 0.95 * baseline, f"held-out MSE {test_mse:.3f} vs global mean {baseline:.3f}"
    assert store.stats()["user"].rows == len(np.unique(users[:split]))
