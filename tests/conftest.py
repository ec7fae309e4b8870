"""Test settings shared by the whole suite: one hypothesis profile, so a developer's run equals
CI's."""

import os

import torch
from hypothesis import HealthCheck, settings

# Deterministic everywhere: derandomized, no example database, no deadline (torch's first call is
# slow). Each test seeds torch itself: hypothesis seeds only `random` and numpy.
settings.register_profile(
    "tinygpt",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    max_examples=50,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("TINYGPT_HYPOTHESIS_PROFILE", "tinygpt"))
# One thread: these models are tiny, and two OpenMP threads on a busy 2-core machine spin against
# each other (a 32-token backward pass measured 0.007 s with one thread, 1.1 s with two).
torch.set_num_threads(1)
