"""Placement and the resource wait without a cluster: the config keys, and what the message says is missing."""

from __future__ import annotations

import pytest

from cluster.runtime.config import ClusterConfig
from cluster.runtime.resources import shortage, workers_that_fit

ONE_CPU = {"CPU": 1.0}


def test_placement_strategy_and_resource_wait_are_validated() -> None:
    assert ClusterConfig().placement_strategy == "PACK" and ClusterConfig().resource_wait_s == 600
    with pytest.raises(ValueError, match="placement_strategy"):
        ClusterConfig(placement_strategy="spread_out")
    with pytest.raises(ValueError, match="resource_wait_s"):
        ClusterConfig(resource_wait_s=0)


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [("PACK", 3), ("SPREAD", 3), ("STRICT_SPREAD", 2), ("STRICT_PACK", 2)],
)
def test_workers_that_fit_follow_the_strategy(strategy: str, expected: int) -> None:
    nodes = [{"CPU": 2.0}, {"CPU": 1.0}, {"GPU": 8.0}]
    assert workers_that_fit(nodes, ONE_CPU, strategy) == expected


def test_shortage_names_the_missing_node() -> None:
    cluster = ClusterConfig(num_workers=2, placement_strategy="STRICT_SPREAD")
    message = shortage([{"CPU": 1.0, "node_a": 1.0}], cluster)
    assert message == "1 alive node(s) hold 1 of 2 workers; missing: 1 more node(s), each with {'CPU': 1.0}"
    assert "could hold every worker" in shortage([{"CPU": 1.0}, {"CPU": 1.0}], cluster)


def test_shortage_counts_gpus() -> None:
    cluster = ClusterConfig(num_workers=4, use_gpu=True)
    message = shortage([{"CPU": 16.0, "GPU": 2.0}], cluster)
    assert message.endswith("missing: 2 more worker slot(s) of {'CPU': 1.0, 'GPU': 1.0}")
