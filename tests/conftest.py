"""The test tiers and the shared fixtures.

A test that uses a Ray cluster or the S3 server is in the slow tier (`slow`, README "Development"); the
fixtures live in two named modules: `fixture_servers` (S3, Ray clusters, caches) and `fixture_data` (demo worlds,
shards, SD-2-structured bases).  Job runners are in `job_runs`.
"""

from __future__ import annotations

import pytest
from fixture_data import demo_real, eval_world, sd2_bases  # noqa: F401  (fixtures)
from fixture_servers import autoscaling_cluster, ray_cluster, ray_test_cluster, s3_env, s3_server, skindual_cache  # noqa: F401

SLOW_FIXTURES = {"s3_server", "s3_env", "ray_cluster", "ray_test_cluster", "autoscaling_cluster"}
"""A test that needs any of these is in the slow tier."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
