"""The batched serving scorer on the GPU answers exactly as the per-query reference does:
eagerly, through replayed CUDA graphs (the default there), and across versions the graphs load."""

from __future__ import annotations

import pytest
import torch

from tests.serving.test_scorer import (
    test_a_mixed_batch_answers_each_query_as_if_alone as mixed_batch,
)
from tests.serving.test_scorer import (
    test_graphs_captured_from_several_threads_at_once_answer_right as threads,
)
from tests.serving.test_scorer import (
    test_graphs_take_each_batch_s_version_and_a_grown_catalog as versions,
)


@pytest.mark.parametrize("graphs", [None, False, True])
def test_mixed_batch_on_the_device(device: torch.device, graphs: bool | None) -> None:
    mixed_batch(device.type, graphs)  # type: ignore[arg-type]


def test_graph_versions_on_the_device(device: torch.device) -> None:
    versions(device.type)


def test_graphs_captured_from_several_threads_on_the_device(device: torch.device) -> None:
    threads(device.type)
