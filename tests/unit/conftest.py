"""Hypothesis settings for the pure unit tests.

No deadline: a few properties dissect with scapy, whose first call is slow, and a timing
failure would say nothing about the code under test. Examples are drawn at random each run;
a failing one is replayed from the example database until it passes.
"""
from hypothesis import HealthCheck, settings

settings.register_profile(
    "unit", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("unit")
