"""Path MTU learned from ICMP fragmentation needed (RFC 1191), with an injected clock.

The kernel's numbers: ip_rt_min_pmtu = 512 + 20 + 20 = 552, ip_rt_mtu_expires = 600 s; an
exception is gone once jiffies reach its expiry (time_after_eq()).
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunl.tunnel.pmtu import EXPIRES, MIN_PMTU, PmtuCache

PEER = bytes([172, 16, 0, 2])
OTHER = bytes([172, 16, 0, 3])
DEV_MTU = 1480


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def cache(clock):
    return PmtuCache(clock)


def test_kernel_constants():
    assert MIN_PMTU == 552
    assert EXPIRES == 600.0


def test_unknown_peer_gets_the_default(cache):
    assert cache.get(PEER, DEV_MTU) == DEV_MTU
    assert len(cache) == 0


def test_learn_then_get(cache):
    assert cache.learn(PEER, 1400) == 1400
    assert cache.get(PEER, DEV_MTU) == 1400
    assert cache.get(OTHER, DEV_MTU) == DEV_MTU  # per peer
    assert len(cache) == 1


def test_learned_value_never_exceeds_the_default(cache):
    cache.learn(PEER, 1400)
    assert cache.get(PEER, 1300) == 1300


@pytest.mark.parametrize("reported", [0, 68, 296, 551])
def test_floor_at_552(cache, reported):
    assert cache.learn(PEER, reported) == 552
    assert cache.get(PEER, DEV_MTU) == 552


def test_exactly_552_is_kept(cache):
    assert cache.learn(PEER, 552) == 552
    assert cache.get(PEER, DEV_MTU) == 552


def test_expires_after_600_seconds(cache, clock):
    cache.learn(PEER, 1400)
    clock.now += 599.999
    assert cache.get(PEER, DEV_MTU) == 1400
    clock.now += 0.001  # exactly 600 s after learning: expired, like time_after_eq()
    assert cache.get(PEER, DEV_MTU) == DEV_MTU
    assert len(cache) == 0  # the entry is gone, not just hidden
    clock.now += 1
    assert cache.get(PEER, DEV_MTU) == DEV_MTU


def test_learning_again_restarts_the_timer(cache, clock):
    cache.learn(PEER, 1400)
    clock.now += 500
    cache.learn(PEER, 1300)
    clock.now += 500  # 1000 s after the first, 500 after the second
    assert cache.get(PEER, DEV_MTU) == 1300
    clock.now += 100
    assert cache.get(PEER, DEV_MTU) == DEV_MTU


def test_a_larger_mtu_does_not_raise_the_estimate(cache, clock):
    # RFC 1191 §3: a host MUST NOT increase its estimate of the Path MTU in response to the
    # contents of a Datagram Too Big message (__ip_rt_update_pmtu(): old_mtu < mtu: return)
    cache.learn(PEER, 1300)
    assert cache.learn(PEER, 1400) == 1300
    assert cache.get(PEER, DEV_MTU) == 1300
    # the estimate only grows back by expiring
    clock.now += EXPIRES
    assert cache.get(PEER, DEV_MTU) == DEV_MTU
    assert cache.learn(PEER, 1400) == 1400


def test_clock_is_the_only_time_source(clock):
    # nothing expires while the injected clock stands still, however long the test takes
    cache = PmtuCache(clock)
    cache.learn(PEER, 1000)
    assert all(cache.get(PEER, DEV_MTU) == 1000 for _ in range(1000))


@settings(max_examples=500)
@given(st.lists(st.tuples(st.sampled_from([PEER, OTHER]), st.integers(0, 9000),
                          st.floats(0, 400)), max_size=20),
       st.integers(576, 9000), st.floats(0, 2000))
def test_model(events, default, later):
    """Against a model: per peer, the smallest MTU (floored at 552) since it last expired."""
    clock = FakeClock(0.0)
    cache = PmtuCache(clock)
    model: dict[bytes, tuple[int, float]] = {}
    for peer, mtu, dt in events:
        clock.now += dt
        if peer in model and clock.now >= model[peer][1]:
            del model[peer]
        mtu = max(mtu, 552)
        if peer not in model or mtu <= model[peer][0]:
            model[peer] = (mtu, clock.now + 600)
        assert cache.learn(peer, mtu) == model[peer][0]
    clock.now += later
    for peer in (PEER, OTHER):
        entry = model.get(peer)
        want = default if entry is None or clock.now >= entry[1] else min(entry[0], default)
        assert cache.get(peer, default) == want
