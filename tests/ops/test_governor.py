"""Governor policy on a fake sysfs/procfs tree: sources, levels, hysteresis, flags, memory."""

from __future__ import annotations

import logging

import pytest

from edged.errors import Busy
from edged.ops.governor import LEVELS, Governor, GovernorConfig, InsufficientMemory, profile
from edged.ops.sources import Sources, decode_throttled, parse_throttled

MB = 1 << 20


def make(fakesys, **cfg) -> Governor:
    conf = GovernorConfig(**cfg)
    return Governor(conf, Sources(fakesys.root, zone_type=conf.zone_type, use_vcgencmd=False), cores=2)


def test_sources_read_the_tree(fakesys):
    fakesys.temp(61.5)
    fakesys.throttled(0x50005)
    fakesys.cgroup(200, high_mb=400, max_mb=500, high=3)
    fakesys.psi(1.5, 0.25)
    s = Sources(fakesys.root, use_vcgencmd=False).sample()
    assert s.temp_c == 61.5 and s.zone == "thermal_zone0:cpu-thermal"
    assert decode_throttled(s.throttled) == {
        "raw": "0x50005", "now": ["under_voltage", "throttled"], "since_boot": ["under_voltage", "throttled"]}
    assert s.cpufreq == {"cur_khz": 1500000, "max_khz": 1500000, "hw_max_khz": 1500000}
    assert s.mem_available == 3000 * MB and s.mem_total == 4000 * MB
    assert s.cgroup["path"] == "/system.slice/edged.service"
    assert (s.cgroup["current"], s.cgroup["high"], s.cgroup["max"]) == (200 * MB, 400 * MB, 500 * MB)
    assert s.cgroup["events"]["high"] == 3
    assert s.psi["some"]["avg10"] == 1.5 and s.psi["full"]["avg10"] == 0.25
    # a configured zone type is followed; an absent one is not replaced by another sensor
    assert Sources(fakesys.root, zone_type="gpu-thermal").sample().temp_c == 30.0
    assert Sources(fakesys.root, zone_type="nope").sample().temp_c is None


def test_missing_sources_are_none(tmp_path):
    s = Sources(tmp_path, use_vcgencmd=False).sample()
    assert (s.temp_c, s.throttled, s.cpufreq, s.mem_available, s.cgroup, s.psi) == (None,) * 6
    g = Governor(GovernorConfig(), Sources(tmp_path, use_vcgencmd=False), cores=2)
    assert g.update() == 0 and g.admit(tokens=10**6) is None


def test_parse_throttled_forms():
    assert parse_throttled("throttled=0x50005") == 0x50005
    assert parse_throttled("50005") == 0x50005
    assert parse_throttled("garbage") is None


def test_heating_ramp_up_and_down_with_hysteresis(fakesys, caplog):
    g = make(fakesys, warm_c=70, hot_c=75, critical_c=80, hysteresis_c=5)
    ramp = list(range(40, 91)) + list(range(89, 39, -1))
    seen = []
    changes = []
    g.listeners.append(changes.append)
    with caplog.at_level(logging.INFO, logger="edged.governor"):
        for t in ramp:
            fakesys.temp(t)
            seen.append((t, g.update()))
    ups = [(t, lvl) for (t, lvl), (_, prev) in zip(seen[1:], seen) if lvl > prev]
    downs = [(t, lvl) for (t, lvl), (_, prev) in zip(seen[1:], seen) if lvl < prev]
    assert ups == [(70, 1), (75, 2), (80, 3)]
    # down only hysteresis_c below the threshold that raised the level
    assert downs == [(74, 2), (69, 1), (64, 0)]
    assert [c.new for c in changes] == ["warm", "hot", "critical", "hot", "warm", "normal"]
    assert all("thermal_zone0:cpu-thermal" in c.cause for c in changes)
    assert sum("thermal level" in r.message for r in caplog.records) == 6
    # no flapping around a threshold
    n = len(changes)
    for t in [74.6, 75.2, 74.8, 75.1, 72.0, 76.0, 71.0]:
        fakesys.temp(t)
        g.update()
    assert [c.new for c in changes[n:]] == ["warm", "hot"]


def test_actions_per_level(fakesys):
    g = make(fakesys)
    expect = {40: ("normal", 2, 1.0, None), 72: ("warm", 2, 0.75, None), 77: ("hot", 1, 0.5, 256),
              85: ("critical", 1, 0.25, 64)}
    for t, (name, threads, duty, cap) in expect.items():
        fakesys.temp(t)
        g.update()
        assert (g.level_name, g.threads, g.duty, g.token_cap) == (name, threads, duty, cap)
        opts = {"num_predict": -1}
        g.limit_options(opts)
        assert opts["num_predict"] == (cap or -1)
        err = g.admit(tokens=100)
        if name == "critical":
            assert isinstance(err, Busy) and err.to_dict()["retry_after_ms"] == 30_000
            assert err.to_dict()["reason"] == "thermal"
        else:
            assert err is None
    st = g.status()
    assert st["level"] == "critical" and st["temp_c"] == 85 and st["threads"] == 1 and st["refused"] == 1
    assert "thermal critical 85C" in g.status_line() and "duty 25%" in g.status_line()


def test_throttle_flags_raise_the_level(fakesys):
    g = make(fakesys)
    fakesys.temp(50)
    fakesys.throttled(0x50000)  # only since-boot bits: history, not now
    assert g.update() == 0
    fakesys.throttled(0x1)  # under-voltage now
    assert g.update() == 1 and "under_voltage" in g.cause
    fakesys.throttled(0x2)  # ARM frequency capped
    assert g.update() == 2 and "arm_freq_capped" in g.cause
    fakesys.throttled(0x8)  # soft temperature limit
    assert g.update() == 2
    fakesys.throttled(0x0)
    assert g.update() == 0 and g.cause == "throttle flags cleared"
    g2 = make(fakesys, use_throttle_flags=False)
    fakesys.throttled(0x4)
    assert g2.update() == 0


def test_memory_pressure_in_cgroup_refuses_and_unloads(fakesys):
    g = make(fakesys, reserve_mb=64, tight_mb=128, critical_mb=32)
    g.kv_bytes_per_token = 64 * 1024  # 64 KiB per token
    fakesys.cgroup(100, high_mb=600, max_mb=700)
    g.update()
    assert g.memory_state == "ok" and g.headroom == (600 - 100 - 64) * MB
    assert g.context_cap is None and g.admit(tokens=1000) is None
    # a request whose KV cache cannot fit is refused with a clear error
    err = g.admit(tokens=10_000)  # 625 MiB
    assert isinstance(err, InsufficientMemory) and err.code == "insufficient_memory"
    assert "KV cache needs 625 MiB" in err.message and err.to_dict()["headroom_bytes"] == g.headroom
    # tight: the context a new request may use shrinks
    fakesys.cgroup(450, high_mb=600, max_mb=700)
    g.update()
    assert g.memory_state == "tight" and "memory.high" in g.memory_cause
    assert g.context_cap == (600 - 450 - 64) * MB // 2 // (64 * 1024)
    opts = {}
    assert g.limit_options(opts)["num_ctx"] == g.context_cap
    assert not g.should_unload()
    # critical: refuse new work, unload the idle model
    fakesys.cgroup(520, high_mb=600, max_mb=700)
    g.update()
    assert g.memory_state == "critical" and g.should_unload()
    err = g.admit(tokens=1)
    assert isinstance(err, Busy) and err.to_dict()["reason"] == "memory"
    # loading a model that cannot fit is refused
    with pytest.raises(InsufficientMemory, match="cannot load the model"):
        g.check_load(200 * MB)
    # recovery
    fakesys.cgroup(100, high_mb=600, max_mb=700)
    g.update()
    assert g.memory_state == "ok" and g.admit(tokens=1) is None
    g.check_load(200 * MB)


def test_memory_events_and_psi(fakesys):
    g = make(fakesys)
    fakesys.cgroup(100, high_mb=2000, high=5)
    g.update()
    assert g.memory_state == "ok"  # old events are history
    fakesys.cgroup(100, high_mb=2000, high=7)
    g.update()
    assert g.memory_state == "tight" and "high+2" in g.memory_cause
    fakesys.cgroup(100, high_mb=2000, high=7, max=1)
    g.update()
    assert g.memory_state == "critical"
    fakesys.cgroup(100, high_mb=2000, high=7, max=1)
    g.update()
    assert g.memory_state == "ok"
    fakesys.psi(25.0)
    g.update()
    assert g.memory_state == "tight" and "PSI" in g.memory_cause
    fakesys.psi(30.0, 10.0)
    g.update()
    assert g.memory_state == "critical"


def test_memavailable_without_cgroup(fakesys):
    g = make(fakesys)
    fakesys.meminfo(available_mb=120)
    g.update()
    assert g.memory_state == "tight" and "MemAvailable 120 MiB" in g.memory_cause


def test_profiles_and_validation():
    for name in ("generic", "pi4", "pi5", "zero2w"):
        assert profile(name).validate() == []
    assert profile("pi4").critical_c < 80  # act before the Pi 4 firmware caps the clock
    with pytest.raises(ValueError, match="warm_c < hot_c"):
        Governor(GovernorConfig(warm_c=80, hot_c=75))
    with pytest.raises(ValueError, match="unknown board"):
        profile("pi9")


def test_background_sampling(fakesys):
    g = make(fakesys, interval=0.05)
    changed = []
    g.listeners.append(changed.append)
    g.start()
    try:
        fakesys.temp(90)
        for _ in range(200):
            if changed:
                break
            import time

            time.sleep(0.05)
    finally:
        g.stop()
    assert changed and changed[0].new == "critical"
    assert LEVELS[g.level] == "critical"
