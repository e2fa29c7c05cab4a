"""StoreEmbedding: KeyedJaggedTensor and plain-tensor lookups, autograd, sparse updates."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from liverec.embedding_store import EmbeddingStore, StoreEmbedding, TableConfig


def _module(**table: object) -> StoreEmbedding:
    store = EmbeddingStore([TableConfig("item", 4, **table), TableConfig("user", 2)], seed=1)
    return StoreEmbedding(store, {"history": "item", "target": "item"})


def _kjt() -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["history", "target", "user"],
        values=torch.tensor([1, 2, 3, 2, 5, 60, 70]),
        lengths=torch.tensor([2, 1, 1, 1, 1, 1]),
    )


def test_kjt_lookup_returns_one_embedding_per_value_with_autograd() -> None:
    module = _module()
    out = module(_kjt(), now_s=10)
    assert {name: tuple(t.shape) for name, t in out.items()} == {"history": (3, 4), "target": (2, 4), "user": (2, 2)}
    assert all(t.requires_grad for t in out.values())
    assert torch.equal(out["target"][0], out["history"][1])


def test_a_key_in_two_features_gets_one_step_on_the_summed_gradient() -> None:
    module = _module(optimizer="sgd", lr=1.0)
    out = module(_kjt(), now_s=10)
    before = module.store.embed("item", torch.tensor([2, 1])).clone()
    (out["history"].sum() + 2 * out["target"].sum()).backward()
    assert module.apply_gradients() == 0
    after = module.store.embed("item", torch.tensor([2, 1]))
    assert torch.allclose(after, before - torch.tensor([[3.0], [1.0]]))


def test_plain_tensor_input_and_eval_mode_read_without_changing_anything() -> None:
    module = _module()
    module({"history": torch.tensor([1, 2])}, now_s=0)
    module.apply_gradients()
    module.eval()
    out = module({"history": torch.tensor([2, 99])})
    assert not out["history"].requires_grad
    assert not out["history"][1].any()
    assert sorted(module.store.table_items("item")[0].tolist()) == [1, 2]


def test_non_finite_gradients_are_rejected_through_the_module() -> None:
    module = _module()
    out = module({"history": torch.tensor([1, 2])}, now_s=0)
    (out["history"] * torch.tensor([[float("nan")], [1.0]])).sum().backward()
    assert module.apply_gradients() == 1
    assert module.store.stats()["item"].rejected_gradients == 1


def test_discard_drops_the_step_and_releases_pins() -> None:
    module = _module(max_rows=1, eviction="lru", optimizer="sgd", lr=1.0)
    out = module({"history": torch.tensor([1])}, now_s=0)
    before = module.store.embed("item", torch.tensor([1])).clone()
    out["history"].sum().backward()
    module.discard()
    assert module.apply_gradients() == 0
    assert torch.equal(module.store.embed("item", torch.tensor([1])), before)
    module({"history": torch.tensor([2])}, now_s=1)
    assert module.store.table_items("item")[0].tolist() == [2]


def test_lookups_without_gradient_release_their_pins() -> None:
    module = _module(max_rows=1, eviction="lru")
    module({"history": torch.tensor([1])}, now_s=0)
    module.apply_gradients()
    module({"history": torch.tensor([2])}, now_s=1)
    assert module.store.table_items("item")[0].tolist() == [2]


def test_bad_inputs() -> None:
    module = _module()
    with pytest.raises(ValueError, match="now_s"):
        module({"history": torch.tensor([1])})
    with pytest.raises(TypeError, match="torch.int32"):
        module({"history": torch.tensor([1], dtype=torch.int32)}, now_s=0)
    with pytest.raises(TypeError, match="KeyedJaggedTensor"):
        module(torch.tensor([1]), now_s=0)
    with pytest.raises(KeyError, match="no table 'nope'"):
        StoreEmbedding(module.store, {"f": "nope"})
