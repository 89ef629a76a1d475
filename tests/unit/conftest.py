"""Hypothesis settings for the pure unit tests.

No deadline: a few properties dissect with scapy, whose first call is slow, and a timing
failure would say nothing about the code under test. On a developer's machine examples are
drawn at random each run (a failing one is replayed from the example database until it
passes); under CI (CI=true) the draw is derandomized, so a run can be repeated exactly.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "unit", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
    database=None)
settings.load_profile("ci" if os.environ.get("CI") else "unit")
