"""bench/operator_scale.py keeps working: the real operator process reaches Provisioning for
every export against the benchmark's fast API substitute, which applies patches as a real API
server does (kopf's JSON patch with its resourceVersion test, merge patch preconditions)."""

from __future__ import annotations

import pytest

from bench import operator_fakeapi as fake
from bench import operator_scale


async def test_the_benchmark_measures_the_real_operator_on_a_few_exports() -> None:
    result = await operator_scale.measure_operator(4, singles=1, timeout=60)
    assert len(result["burst"]) == 4 and len(result["single"]) == 1
    assert all(0 < t < 60 for t in result["burst"] + result["single"])
    assert result["requests_per_export"] > 1  # the operator itself made the requests
    assert result["peak_rss"] >= result["idle_rss"] > 10 * 2**20
    assert operator_scale.measure_pure(8, rounds=1) > 0


def test_the_substitute_patches_like_an_api_server() -> None:
    obj = {"metadata": {"resourceVersion": "3", "finalizers": ["a"]}, "spec": {"x": 1}}
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "3"},
        {"op": "add", "path": "/metadata/finalizers/-", "value": "b"},
        {"op": "remove", "path": "/spec/x"},
    ]
    assert fake.json_patch(obj, ops) == {
        "metadata": {"resourceVersion": "3", "finalizers": ["a", "b"]},
        "spec": {},
    }
    with pytest.raises(fake.PatchTestFailed):
        fake.json_patch(obj, [{"op": "test", "path": "/metadata/resourceVersion", "value": "2"}])
    assert fake.merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": 3}}) == {
        "a": {"c": 2, "d": 3}
    }
