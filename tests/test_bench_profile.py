"""bench/profile_round.py's section timer: exclusive seconds per call path add up to the whole."""

import itertools

from conftest import bench_module

profile_round = bench_module("profile_round")


def test_nested_sections_are_exclusive_and_add_up(monkeypatch):
    ticks = itertools.count()  # each clock read advances one second
    monkeypatch.setattr(profile_round.time, "perf_counter", lambda: float(next(ticks)))
    s = profile_round.Sections()
    inner = s.wrap("inner", lambda: None)

    def outer_body():
        inner()
        inner()

    outer = s.wrap("outer", outer_body)
    outer()
    # outer: reads at 0 and 5; each inner call reads twice (1-2, 3-4): 1 s each
    assert dict(s.exclusive) == {"outer": 3.0, "outer > inner": 2.0}
    assert s.inclusive["outer"] == 5.0 and s.calls["outer > inner"] == 2
    rows = profile_round.table(s)
    assert [r["section"] for r in rows] == ["outer", "outer > inner"]  # the order sections start
    assert sum(r["share"] for r in rows) == 1.0
