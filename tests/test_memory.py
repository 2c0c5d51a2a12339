import asyncio
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from capsd import config, preflight
from capsd.memory import (
    CLIENT_AUDIO_PER_WORKER_BYTES,
    DICTATION_RESERVE_BYTES,
    MIB,
    PARSE_FRAMES,
    SUPERVISOR_BASELINE_BYTES,
    WORKER_BASELINE_BYTES,
    Available,
    client_audio_bytes,
    estimate_supervisor_bytes,
    estimate_worker_bytes,
    plan,
    read_available,
)
from capsd.selftest.build import build_paraformer
from capsd.selftest.tones import synth
from tests.support.checks import assert_exact, run_client, wait_for

GIB = 2**30
V1_UNLIMITED = "9223372036854771712"


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    cgroup.mkdir()
    return proc, cgroup


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def machine(proc: Path, available: int, self_cgroup: str = "0::/\n") -> None:
    write(
        proc / "meminfo",
        f"MemTotal:       {32 * GIB // 1024} kB\nMemFree:        1000 kB\nMemAvailable:   {available // 1024} kB\n",
    )
    write(proc / "self" / "cgroup", self_cgroup)


def v2(cgroup: Path, path: str, limit: str, current: int) -> None:
    write(cgroup / path / "memory.max", limit + "\n")
    write(cgroup / path / "memory.current", f"{current}\n")


def v1(cgroup: Path, path: str, limit: str, usage: int) -> None:
    write(cgroup / "memory" / path / "memory.limit_in_bytes", limit + "\n")
    write(cgroup / "memory" / path / "memory.usage_in_bytes", f"{usage}\n")


SERVICE = "system.slice/capsd.service"


@pytest.mark.unit
def test_without_a_cgroup_limit_the_machines_available_memory_counts(roots: tuple[Path, Path]) -> None:
    proc, cgroup = roots
    machine(proc, 8 * GIB)
    got = read_available(proc, cgroup)
    assert got == Available(8 * GIB, "machine", "MemAvailable 8.0 GiB")


@pytest.mark.unit
def test_a_cgroup_v2_limit_tighter_than_the_machine_counts_less_what_is_in_use(roots: tuple[Path, Path]) -> None:
    proc, cgroup = roots
    machine(proc, 8 * GIB, f"0::/{SERVICE}\n")
    v2(cgroup, SERVICE, str(3 * GIB // 2), 600 * MIB)
    got = read_available(proc, cgroup)
    assert (got.bytes, got.limit) == (3 * GIB // 2 - 600 * MIB, "cgroup")
    assert got.detail == f"cgroup /{SERVICE} limit 1.5 GiB minus 600 MiB in use"


@pytest.mark.unit
def test_a_cgroup_v2_limit_looser_than_the_machine_leaves_the_machine(roots: tuple[Path, Path]) -> None:
    proc, cgroup = roots
    machine(proc, 1 * GIB, f"0::/{SERVICE}\n")
    v2(cgroup, SERVICE, str(4 * GIB), 100 * MIB)
    assert read_available(proc, cgroup).limit == "machine"


@pytest.mark.unit
def test_v2_max_is_no_limit(roots: tuple[Path, Path]) -> None:
    proc, cgroup = roots
    machine(proc, 8 * GIB, f"0::/{SERVICE}\n")
    v2(cgroup, SERVICE, "max", 600 * MIB)
    v2(cgroup, "system.slice", "max", 900 * MIB)
    assert read_available(proc, cgroup).limit == "machine"


@pytest.mark.unit
def test_a_cgroup_v2_parent_tighter_than_its_child_counts(roots: tuple[Path, Path]) -> None:
    proc, cgroup = roots
    machine(proc, 8 * GIB, f"0::/{SERVICE}\n")
    v2(cgroup, SERVICE, str(4 * GIB), 100 * MIB)
    v2(cgroup, "system.slice", str(2 * GIB), 1 * GIB)
    got = read_available(proc, cgroup)
    assert got.bytes == 1 * GIB
    assert got.detail.startswith("cgroup /system.slice limit 2.0 GiB")


@pytest.mark.unit
def test_v2_container_mount_root_is_own_cgroup(roots: tuple[Path, Path]) -> None:
    # No cgroup namespace: /proc/self/cgroup names a host path the mount does not have.
    proc, cgroup = roots
    machine(proc, 8 * GIB, "0::/docker/abc123\n")
    v2(cgroup, "", str(1 * GIB), 200 * MIB)
    assert read_available(proc, cgroup).bytes == 1 * GIB - 200 * MIB


@pytest.mark.unit
def test_a_cgroup_v1_limit_counts_less_what_the_cgroup_uses(roots: tuple[Path, Path]) -> None:
    proc, cgroup = roots
    machine(proc, 8 * GIB, "5:cpu,cpuacct:/x\n4:memory:/capsd\n0::/\n")
    v1(cgroup, "capsd", str(1 * GIB), 300 * MIB)
    got = read_available(proc, cgroup)
    assert (got.bytes, got.limit) == (1 * GIB - 300 * MIB, "cgroup")


@pytest.mark.unit
def test_a_cgroup_v1_memory_controller_among_others_is_found(roots: tuple[Path, Path]) -> None:
    proc, cgroup = roots
    machine(proc, 8 * GIB, "4:blkio,memory:/capsd\n")
    v1(cgroup, "capsd", str(1 * GIB), 0)
    assert read_available(proc, cgroup).bytes == 1 * GIB


@pytest.mark.unit
def test_v1_huge_number_is_no_limit(roots: tuple[Path, Path]) -> None:
    proc, cgroup = roots
    machine(proc, 8 * GIB, "4:memory:/capsd\n")
    v1(cgroup, "capsd", V1_UNLIMITED, 300 * MIB)
    v1(cgroup, "", V1_UNLIMITED, 900 * MIB)
    assert read_available(proc, cgroup) == Available(8 * GIB, "machine", "MemAvailable 8.0 GiB")


@pytest.mark.unit
def test_a_hybrid_cgroup_setup_takes_the_tightest_limit(roots: tuple[Path, Path]) -> None:
    proc, cgroup = roots
    machine(proc, 8 * GIB, f"4:memory:/{SERVICE}\n0::/{SERVICE}\n")
    v1(cgroup, SERVICE, str(2 * GIB), 1 * GIB)
    v2(cgroup, SERVICE, str(3 * GIB), 1 * GIB)
    assert read_available(proc, cgroup).bytes == 1 * GIB
    v1(cgroup, SERVICE, str(4 * GIB), 1 * GIB)
    assert read_available(proc, cgroup).bytes == 2 * GIB


@pytest.mark.unit
def test_usage_above_limit_is_zero_headroom(roots: tuple[Path, Path]) -> None:
    proc, cgroup = roots
    machine(proc, 8 * GIB, f"0::/{SERVICE}\n")
    v2(cgroup, SERVICE, str(1 * GIB), 2 * GIB)
    assert read_available(proc, cgroup).bytes == 0


@pytest.mark.unit
def test_missing_cgroup_files_give_no_limit(roots: tuple[Path, Path]) -> None:
    proc, cgroup = roots
    machine(proc, 8 * GIB, f"4:memory:/{SERVICE}\n0::/{SERVICE}\n")
    assert read_available(proc, cgroup).limit == "machine"
    (proc / "self" / "cgroup").unlink()
    assert read_available(proc, cgroup).limit == "machine"


@pytest.mark.unit
def test_unreadable_limit_gives_no_limit(roots: tuple[Path, Path]) -> None:
    proc, cgroup = roots
    machine(proc, 8 * GIB, f"0::/{SERVICE}\n")
    (cgroup / SERVICE / "memory.max").mkdir(parents=True)  # reading a directory raises OSError
    assert read_available(proc, cgroup).limit == "machine"


@pytest.mark.unit
def test_missing_usage_still_applies_the_limit(roots: tuple[Path, Path]) -> None:
    proc, cgroup = roots
    machine(proc, 8 * GIB, f"0::/{SERVICE}\n")
    write(cgroup / SERVICE / "memory.max", str(1 * GIB))
    assert read_available(proc, cgroup).bytes == 1 * GIB


@pytest.mark.unit
@pytest.mark.parametrize("self_cgroup", ["", "garbage\n", "0::\n", ":::\n", "\x00\xff\n", "4:memory\n"])
def test_a_garbled_proc_self_cgroup_falls_back_to_the_machine(roots: tuple[Path, Path], self_cgroup: str) -> None:
    proc, cgroup = roots
    machine(proc, 8 * GIB, self_cgroup)
    assert read_available(proc, cgroup).bytes == 8 * GIB


@pytest.mark.unit
@pytest.mark.parametrize("content", ["", "lots\n", "-\n", "1.5G\n", "max max\n"])
def test_garbled_limit_files_fall_back_to_the_machine(roots: tuple[Path, Path], content: str) -> None:
    proc, cgroup = roots
    machine(proc, 8 * GIB, f"4:memory:/{SERVICE}\n0::/{SERVICE}\n")
    write(cgroup / SERVICE / "memory.max", content)
    write(cgroup / "memory" / SERVICE / "memory.limit_in_bytes", content)
    assert read_available(proc, cgroup).limit == "machine"


@pytest.mark.unit
@pytest.mark.parametrize("meminfo", [None, "", "MemAvailable:\n", "MemAvailable: lots kB\n"])
def test_unreadable_meminfo_falls_back_to_psutil(roots: tuple[Path, Path], meminfo: str | None) -> None:
    proc, cgroup = roots
    if meminfo is not None:
        write(proc / "meminfo", meminfo)
    got = read_available(proc, cgroup)
    assert got.limit == "machine"
    assert got.detail.startswith("psutil available")
    assert abs(got.bytes - psutil.virtual_memory().available) < 512 * MIB


@pytest.mark.unit
def test_unreadable_meminfo_still_counts_the_cgroup(roots: tuple[Path, Path]) -> None:
    proc, cgroup = roots
    write(proc / "self" / "cgroup", f"0::/{SERVICE}\n")
    v2(cgroup, SERVICE, str(64 * MIB), 0)
    assert read_available(proc, cgroup).bytes == 64 * MIB


@pytest.mark.unit
def test_read_available_on_this_machine() -> None:
    got = read_available()
    assert got.bytes > 0 and got.limit in ("machine", "cgroup")


@pytest.mark.unit
def test_estimate_grows_with_each_input() -> None:
    base = estimate_worker_bytes(0, 1, 0)
    assert base > WORKER_BASELINE_BYTES
    assert estimate_worker_bytes(230 * 10**6, 1, 0) > base + 230 * 10**6
    assert estimate_worker_bytes(0, 4, 0) > base
    assert estimate_worker_bytes(0, 1, 17) > base
    assert estimate_worker_bytes(0, 1, 60) > estimate_worker_bytes(0, 1, 17)


@pytest.mark.unit
def test_a_bigger_model_needs_more_per_second_of_audio() -> None:
    def per_second(model_bytes: int) -> int:
        return estimate_worker_bytes(model_bytes, 1, 61) - estimate_worker_bytes(model_bytes, 1, 60)

    assert per_second(230 * 10**6) > per_second(6 * 10**6) > per_second(0) > 0


@pytest.mark.unit
def test_a_punctuation_model_is_loaded_but_does_not_read_audio() -> None:
    with_punctuation = estimate_worker_bytes(0, 1, 120, punctuation_bytes=70 * 10**6)
    assert estimate_worker_bytes(0, 1, 120) + 70 * 10**6 <= with_punctuation < estimate_worker_bytes(70 * 10**6, 1, 120)


@pytest.mark.unit
def test_supervisor_grows_with_each_busy_worker_and_with_the_longest_frame() -> None:
    assert estimate_supervisor_bytes(0, 0, 0) == SUPERVISOR_BASELINE_BYTES + DICTATION_RESERVE_BYTES
    step = estimate_supervisor_bytes(1, 120, FRAME) - estimate_supervisor_bytes(0, 120, FRAME)
    assert step > CLIENT_AUDIO_PER_WORKER_BYTES
    assert estimate_supervisor_bytes(3, 120, FRAME) == estimate_supervisor_bytes(0, 120, FRAME) + 3 * step
    assert estimate_supervisor_bytes(0, 120, FRAME) - estimate_supervisor_bytes(0, 120, 0) == (2 + PARSE_FRAMES) * FRAME
    assert client_audio_bytes(2, FRAME) == 2 * FRAME + 2 * CLIENT_AUDIO_PER_WORKER_BYTES


CGROUP = Available(900 * MIB + 512 * MIB, "cgroup", "cgroup limit 1.5 GiB minus 600 MiB in use")
FRAME = 16 * MIB  # [server] max_message_bytes, its default


def supervisor(count: int) -> int:
    """The supervisor's estimate when segments and frames are 0 long: its baseline, the dictation
    reserve and each worker's share of client audio."""
    return estimate_supervisor_bytes(count, 0, 0)


@pytest.mark.unit
def test_a_plan_that_does_not_fit_says_how_many_workers_would() -> None:
    p = plan(3, 410 * MIB, CGROUP, 512 * MIB, 0, 0)
    assert not p.fits
    assert p.total_bytes == 3 * 410 * MIB + supervisor(3)
    assert p.available_bytes == 900 * MIB
    assert p.max_count == 1 == (900 * MIB - supervisor(0)) // (410 * MIB + supervisor(1) - supervisor(0))
    assert p.message() == (
        f"memory plan does not fit: 3 workers x 410 MiB + supervisor {supervisor(3) // MIB} MiB = 1.3 GiB,"
        " available 900 MiB (cgroup limit 1.5 GiB minus 600 MiB in use,"
        " minus memory_reserve_mb 512); at most 1 worker fits; set [workers] count = 1"
    )


@pytest.mark.unit
@pytest.mark.parametrize("seconds", [0, 120])
def test_plan_max_count_is_exact(seconds: float) -> None:
    fits = Available(2 * 100 * MIB + estimate_supervisor_bytes(2, seconds, FRAME), "machine", "MemAvailable")
    assert plan(2, 100 * MIB, fits, 0, seconds, FRAME).fits
    assert plan(3, 100 * MIB, fits, 0, seconds, FRAME).max_count == 2
    short = Available(fits.bytes - 1, "machine", "MemAvailable")
    assert not plan(2, 100 * MIB, short, 0, seconds, FRAME).fits
    assert plan(2, 100 * MIB, short, 0, seconds, FRAME).max_count == 1
    assert "at most 1 worker fits; set [workers] count = 1" in plan(2, 100 * MIB, short, 0, seconds, FRAME).message()


@pytest.mark.unit
def test_a_plan_that_fits_says_so_and_how_many_would() -> None:
    p = plan(2, 410 * MIB, Available(8 * GIB, "machine", "MemAvailable 8.0 GiB"), 512 * MIB, 0, 0)
    assert p.fits
    assert p.max_count == (8 * GIB - 512 * MIB - supervisor(0)) // (410 * MIB + supervisor(1) - supervisor(0))
    total = (2 * 410 * MIB + supervisor(2)) // MIB
    assert p.message() == (
        f"memory plan fits: 2 workers x 410 MiB + supervisor {supervisor(2) // MIB} MiB = {total} MiB of 7.5 GiB available"
        f" (MemAvailable 8.0 GiB, minus memory_reserve_mb 512); at most {p.max_count} workers"
        " would fit"
    )


@pytest.mark.unit
@pytest.mark.parametrize("free", [0, 100 * MIB, 600 * MIB])
def test_a_plan_where_not_even_one_worker_fits_says_so_and_no_count_to_set(free: int) -> None:
    p = plan(1, 410 * MIB, Available(free, "cgroup", "cgroup limit"), 512 * MIB, 120, FRAME)
    assert not p.fits
    assert p.max_count == 0
    assert p.available_bytes == max(0, free - 512 * MIB)
    assert "not even 1 worker fits" in p.message()
    assert "set [workers] count" not in p.message()


@pytest.mark.integration
def test_a_worker_above_its_estimate_is_reported_once(start_capsd: Any, tmp_path: Path) -> None:
    # 96 MiB of weights made when the model loads: the few-KB file hides them from the plan.
    model = tmp_path / "unseen"
    build_paraformer(model, unseen_mib=96)
    capsd = start_capsd({"model": {"dir": str(model)}, "workers": {"preload": False}})  # each worker makes them
    samples, _ = synth("123")
    for n in range(2):
        asyncio.run(run_client(capsd.url, [(f"t{n}", "mic", samples, (15, 2))]))
    wait_for(lambda: "worker above its memory estimate" in capsd.logs(), what="the warning")
    time.sleep(1)  # two more checks, which must not repeat it
    [line] = [line for line in capsd.logs().splitlines() if "worker above its memory estimate" in line]
    fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
    status = capsd.status()
    assert fields["pid"] == str(status["slots"][0]["pid"])
    assert int(fields["estimate_mb"]) == capsd.plan().worker_bytes // MIB < int(fields["rss_mb"])


def peak_rss(pid: int) -> int:
    """A process's peak resident memory so far (VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


@pytest.mark.integration
def test_weights_grow_a_worker_by_their_size_within_its_estimate(start_capsd: Any, tmp_path: Path) -> None:
    # The same worker with no weights, then 64 MiB in the file: the RSS after the same decode
    # differs by the weights, and the plan, reading the file's size, stays above the peak.
    digits = "31415926535897932384"
    samples, starts = synth(digits)
    rss = {}
    for mib in (0, 64):
        model = tmp_path / f"weights{mib}"
        build_paraformer(model, weights_mib=mib)
        settings = {"model": {"dir": str(model)}, "workers": {"preload": False}}  # each worker its own copy
        capsd = start_capsd(settings)
        frames = asyncio.run(run_client(capsd.url, [("weights", "file", samples, (60, 2))]))
        assert_exact(frames["weights"], digits, starts)
        pid = capsd.worker_pid(0)
        rss[mib] = psutil.Process(pid).memory_info().rss
        _, estimate = preflight.worker(config.from_dict(settings))
        assert peak_rss(pid) <= estimate.worker
        capsd.stop()
    assert rss[64] - rss[0] == pytest.approx(64 * MIB, rel=0.1)
