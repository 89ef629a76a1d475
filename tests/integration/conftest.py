"""The data plane the integration tests run on.

Modules that exercise tunl's own data planes mark themselves `pytestmark = PLANES`: each of
their tests then runs on the eBPF plane and on the userspace plane, with the same assertions
(TUNL_DATAPLANE is the default of every `tunl tunnel add` the test runs, its lab's included).
"""
from __future__ import annotations

import pytest

import nsutil
from nsutil import ebpf_unavailable


@pytest.fixture(scope="module", params=["ebpf", "userspace"])
def dataplane(request):
    if request.param == "ebpf":
        why = ebpf_unavailable()
        if why:
            pytest.skip(f"no eBPF data plane here: {why}")
    old = nsutil.ENV.get("TUNL_DATAPLANE")
    nsutil.ENV["TUNL_DATAPLANE"] = request.param
    yield request.param
    if old is None:
        nsutil.ENV.pop("TUNL_DATAPLANE", None)
    else:
        nsutil.ENV["TUNL_DATAPLANE"] = old
