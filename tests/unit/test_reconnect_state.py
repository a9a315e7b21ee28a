"""The reconnect state machine, driven with fake time (owner: agent engineer)."""

import pytest
from nbd_agent.reconnect import Backoff, LinkState, Reconnector


def test_backoff_doubles_and_is_capped():
    b = Backoff(initial=0.05, factor=2.0, maximum=1.0)
    assert [b.delay(n) for n in (1, 2, 3, 4, 5, 6, 7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert Backoff().delay(100) == Backoff().maximum


def test_a_watched_healthy_device_has_nothing_due():
    r = Reconnector()
    r.watch(0, now=0.0)
    assert r.due(100.0) == []
    assert r.next_deadline() is None


def test_link_dead_makes_an_attempt_due_at_once():
    r = Reconnector()
    r.watch(3, now=0.0)
    assert r.link_dead(3, now=10.0)
    assert r.watches[3].state is LinkState.RECONNECTING
    assert r.next_deadline() == 10.0
    assert [w.index for w in r.due(10.0)] == [3]
    assert r.due(10.0) == []  # in an attempt: not handed out twice


def test_link_dead_of_a_device_we_do_not_watch_is_ignored():
    r = Reconnector()
    assert not r.link_dead(7, now=1.0)
    assert r.due(1.0) == []


def test_failures_back_off_and_never_give_up():
    r = Reconnector(backoff=Backoff(initial=0.1, factor=2.0, maximum=0.4))
    r.watch(0, now=0.0)
    r.link_dead(0, now=0.0)
    now = 0.0
    delays = []
    for _ in range(6):
        assert [w.index for w in r.due(now)] == [0]
        delays.append(r.failed(0, now, "refused"))
        assert r.due(now) == []  # not before the backoff expires
        deadline = r.next_deadline()
        assert deadline is not None and deadline == pytest.approx(now + delays[-1])
        now = deadline
    assert delays == [0.1, 0.2, 0.4, 0.4, 0.4, 0.4]
    assert r.watches[0].last_error == "refused"
    assert r.watches[0].state is LinkState.RECONNECTING


def test_success_reports_the_outage_and_makes_the_device_healthy():
    r = Reconnector()
    r.watch(1, now=0.0)
    r.link_dead(1, now=5.0)
    r.due(5.0)
    r.failed(1, 5.1, "refused")
    r.due(6.0)
    assert r.succeeded(1, now=6.5) == pytest.approx(1.5)
    w = r.watches[1]
    assert (w.state, w.failures, w.next_attempt, w.dead_since) == (
        LinkState.HEALTHY,
        0,
        None,
        None,
    )


def test_a_second_link_dead_while_reconnecting_does_not_reset_the_backoff():
    r = Reconnector()
    r.watch(0, now=0.0)
    r.link_dead(0, now=0.0)
    r.due(0.0)
    r.failed(0, 0.0, "refused")
    r.link_dead(0, now=0.01)  # the second socket of a multi-connection device dies too
    assert r.watches[0].failures == 1
    assert r.watches[0].dead_since == 0.0


def test_link_dead_during_an_attempt_schedules_another_attempt_after_success():
    r = Reconnector()
    r.watch(0, now=0.0)
    r.link_dead(0, now=0.0)
    r.due(0.0)
    r.link_dead(0, now=0.5)  # e.g. the second connection died while we handed the first
    assert r.succeeded(0, now=1.0) == pytest.approx(1.0)
    assert r.watches[0].state is LinkState.RECONNECTING
    assert [w.index for w in r.due(1.0)] == [0]


def test_adoption_verifies_the_link_right_away():
    r = Reconnector()
    r.watch(4, now=2.0, verify=True)
    assert [w.index for w in r.due(2.0)] == [4]


def test_forget_ends_the_watch():
    r = Reconnector()
    r.watch(0, now=0.0)
    r.link_dead(0, now=0.0)
    r.forget(0)
    assert r.due(1.0) == [] and r.next_deadline() is None


def test_next_deadline_is_the_earliest_pending_attempt():
    r = Reconnector(backoff=Backoff(initial=1.0, factor=2.0, maximum=8.0))
    for index in (0, 1):
        r.watch(index, now=0.0)
        r.link_dead(index, now=0.0)
    r.due(0.0)
    r.failed(0, 0.0, "x")  # next at 1.0
    r.failed(1, 0.0, "x")
    r.due(1.0)
    r.failed(0, 1.0, "x")  # second failure: next at 1.0 + 2.0
    r.succeeded(1, 1.0)  # healthy: no deadline of its own
    assert r.next_deadline() == 3.0
