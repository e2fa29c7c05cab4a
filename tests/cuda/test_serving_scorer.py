"""The batched serving scorer on the GPU answers exactly as the per-query reference does."""

from __future__ import annotations

import torch

from tests.serving.test_scorer import test_a_mixed_batch_answers_each_query_as_if_alone as mixed_batch


def test_mixed_batch_on_the_device(device: torch.device) -> None:
    mixed_batch(device.type)
