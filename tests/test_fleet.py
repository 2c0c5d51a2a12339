"""HAProxy in front of two real capsd, with the repo's etc/haproxy/capsd.cfg: CapsWriter tasks
spread over the fleet and stay exact; a capsd that stops gracefully is marked down before its
connections close and its tasks in progress finish; a killed one costs only its own connections."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from capsd.protocol import FILE_SEG, file_frames
from capsd.selftest.tones import synth
from tests.support.checks import assert_exact, http_get, wait_for
from tests.support.client import connect, receive, send_file, send_mic
from tests.support.daemon import Capsd, free_port

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/local/sbin:/usr/sbin")  # root's PATH or not
CONFIG = Path(__file__).resolve().parent.parent / "etc" / "haproxy" / "capsd.cfg"
SERVERS = ("capsd-a", "capsd-b")  # the config's server lines, filled from CAPSD_A and CAPSD_B

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="etc/haproxy/capsd.cfg chroots and drops to user haproxy: needs root"),
]

Job = tuple[str, str, np.ndarray, tuple[float, float]]


class HAProxy:
    """HAProxy run in the foreground with the repo's config, addresses filled in from the environment."""

    def __init__(self, tmp: Path, backends: list[Capsd]) -> None:
        assert HAPROXY is not None
        self.port = free_port()
        self.stats_port = free_port()
        self.socket = tmp / "haproxy.sock"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPSD_", "HAPROXY_"))}
        env |= {f"CAPSD_{letter}": f"127.0.0.1:{capsd.port}" for letter, capsd in zip("AB", backends)}
        env |= {"CAPSD_LISTEN": f"127.0.0.1:{self.port}", "HAPROXY_SOCKET": str(self.socket),
                "HAPROXY_STATS": f"127.0.0.1:{self.stats_port}", "HAPROXY_LOG": "stdout"}  # fmt: skip
        self.log_path = tmp / "haproxy.log"
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(CONFIG)], stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        self.url = f"ws://127.0.0.1:{self.port}"

    def command(self, line: str) -> str:
        """One command on the runtime API (the stats socket)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stat(self) -> dict[str, dict[str, str]]:
        """`show stat` of the capsd backend: one row per server, and BACKEND."""
        rows = csv.DictReader(io.StringIO(self.command("show stat").removeprefix("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == "capsd" and row["svname"] != "FRONTEND"}

    def state(self, server: str) -> str:
        """UP, DOWN, DRAIN, MAINT ... ("UP 1/2", going down, is still UP)."""
        return self.stat()[server]["status"].split()[0]

    def checked_up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited {self.proc.returncode}:\n{self.logs()}")
        try:
            servers = self.stat()
        except OSError:  # not listening yet
            return False
        return all(
            servers.get(name, {}).get("check_status") == "L7OK" and servers[name]["status"] == "UP" for name in SERVERS
        )

    def get(self, path: str, port: int | None = None) -> tuple[int, str]:
        return http_get(port or self.port, path)

    def logs(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


Fleet = tuple[list[Capsd], HAProxy]


@pytest.fixture
def start_fleet(start_capsd: Any, tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    """Two capsd (1 worker each, on the two cores) and HAProxy in front, every check passing."""
    proxies: list[HAProxy] = []

    def start(config: dict[str, dict[str, Any]] | None = None) -> Fleet:
        fleet = [start_capsd(config) for _ in SERVERS]
        proxy = HAProxy(tmp_path, fleet)
        proxies.append(proxy)
        wait_for(proxy.checked_up, 30, "haproxy up, both capsd checked ready")
        return fleet, proxy

    yield start
    for proxy in proxies:
        proxy.stop()


def tasks(capsd: Capsd, key: str = "tasks_done") -> int:
    return sum(slot[key] for slot in capsd.status()["slots"])


def scrape(capsd: Capsd) -> dict[str, float]:
    """GET /metrics of one capsd, directly: each metric summed over its labels."""
    status, body = http_get(capsd.port, "/metrics")
    assert status == 200
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0) + sample.value
    return sums


def the_one(fleet: list[Capsd], holds: Callable[[Capsd], bool]) -> Capsd | None:
    """The one capsd of the fleet for which `holds` is true, or None."""
    found = [capsd for capsd in fleet if holds(capsd)]
    return found[0] if len(found) == 1 else None


def other(fleet: list[Capsd], capsd: Capsd) -> Capsd:
    return fleet[1 - fleet.index(capsd)]


def server(fleet: list[Capsd], capsd: Capsd) -> str:
    """Its name in HAProxy."""
    return SERVERS[fleet.index(capsd)]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def digits(n: int, offset: int) -> str:
    """n digits, none repeated next to itself, different per offset."""
    return ("1234567890" * (n // 10 + 2))[offset % 10 :][:n]


Work = tuple[Job, str, list[float]]  # a task, its digits, their start times


def dictation(task_id: str, n: int = 6, offset: int = 0) -> Work:
    text = digits(n, offset)
    samples, starts = synth(text)
    return (task_id, "mic", samples, (15, 2)), text, starts


def transcription(task_id: str, n: int = 40, offset: int = 0) -> Work:
    text = digits(n, offset)
    samples, starts = synth(text)
    return (task_id, "file", samples, FILE_SEG), text, starts


async def send(ws: Any, job: Job) -> None:
    task_id, source, samples, seg = job
    if source == "file":
        await send_file(ws, task_id, samples, seg=seg)
    else:
        await send_mic(ws, task_id, samples, seg=seg)


async def new_tasks(url: str, count: int, prefix: str) -> None:
    """`count` new clients, connected together, one dictation each: all exact."""
    async with AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(connect(url)) for _ in range(count)]
        for i, ws in enumerate(sockets):
            job, text, starts = dictation(f"{prefix}-{i}", offset=i)
            await send(ws, job)
            assert_exact((await receive(ws, {job[0]}))[job[0]], text, starts)


def test_tasks_spread_over_the_fleet_and_stay_exact(start_fleet: Callable[..., Fleet]) -> None:
    fleet, proxy = start_fleet()
    connections, per_connection = 4, 5
    work = [
        [(dictation if (c + t) % 2 else transcription)(f"conn{c}-task{t}", offset=c + t) for t in range(per_connection)]
        for c in range(connections)
    ]

    async def run(ws: Any, sent: list[Work]) -> dict[str, list[dict[str, Any]]]:
        for job, _, _ in sent:
            await send(ws, job)
        return await receive(ws, {job[0] for job, _, _ in sent})

    async def clients() -> list[dict[str, list[dict[str, Any]]]]:
        async with AsyncExitStack() as stack:
            # All open at once, as CapsWriter clients stay connected: leastconn spreads them.
            sockets = [await stack.enter_async_context(connect(proxy.url)) for _ in range(connections)]
            return await asyncio.gather(*(run(ws, sent) for ws, sent in zip(sockets, work)))

    for frames, sent in zip(asyncio.run(clients()), work):
        for job, text, starts in sent:
            assert_exact(frames[job[0]], text, starts)
    done = [tasks(capsd) for capsd in fleet]
    assert all(done) and sum(done) == connections * per_connection, done
    assert [tasks(capsd, "tasks_failed") for capsd in fleet] == [0, 0]
    # Plain GETs through HAProxy are about the fleet; each capsd is scraped directly.
    assert proxy.get("/readyz") == (200, "ready: 2 capsd ready\n")
    assert proxy.get("/livez") == (200, "alive\n")
    assert proxy.get("/metrics")[0] == 404
    assert "haproxy_server_status" in proxy.get("/metrics", proxy.stats_port)[1]


def test_a_drained_capsd_keeps_its_connections_and_takes_no_new_one(start_fleet: Callable[..., Fleet]) -> None:
    fleet, proxy = start_fleet()

    async def scenario() -> None:
        async with connect(proxy.url) as ws:
            drained = await asyncio.to_thread(
                wait_for, lambda: the_one(fleet, lambda c: c.status()["connections"] == 1), 30, "connected"
            )
            proxy.command(f"set server capsd/{server(fleet, drained)} state drain")
            assert proxy.state(server(fleet, drained)) == "DRAIN"
            await new_tasks(proxy.url, 4, "new")
            job, text, starts = transcription("on-the-drained-one")
            await send(ws, job)
            assert_exact((await receive(ws, {job[0]}))[job[0]], text, starts)
            assert (tasks(drained), tasks(other(fleet, drained))) == (1, 4)

    asyncio.run(scenario())


def test_a_stopping_capsd_is_marked_down_before_its_tasks_end(
    start_fleet: Callable[..., Fleet], heavy_model: Path
) -> None:
    # stop_timeout_s: on a busy machine the test's own steps between the SIGTERM and the long
    # task's last frame take a while, and that task must still finish.
    fleet, proxy = start_fleet({"model": {"dir": str(heavy_model)}, "server": {"stop_timeout_s": 120}})
    text = digits(180, 0)
    samples, starts = synth(text)  # a 90 s file: a 60 s frame, then the last 30 s with is_final
    first, last = file_frames("long-file", samples)

    async def scenario() -> Capsd:
        async with connect(proxy.url) as ws:
            await ws.send(first)
            stopping = await asyncio.to_thread(
                wait_for, lambda: the_one(fleet, lambda c: tasks(c, "tasks_in_progress") == 1), 30, "in progress"
            )
            stopping.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_for, lambda: "stopping" in stopping.logs(), 30, "stopping")
            # New clients at once, before HAProxy may have seen it: a handshake sent to the
            # stopping capsd gets 503 there and is tried again on the other.
            await new_tasks(proxy.url, 4, "at-once")
            name = server(fleet, stopping)
            await asyncio.to_thread(wait_for, lambda: proxy.state(name) == "DOWN", 30, "marked down")
            assert ws.state is State.OPEN  # down in HAProxy before the connection of its task closes
            await new_tasks(proxy.url, 4, "after")
            # Its control socket is closed while it stops; its /metrics, scraped directly, still answer.
            metrics = scrape(stopping)
            assert (metrics["capsd_connections"], metrics["capsd_tasks_in_progress"]) == (1, 1)
            assert metrics.get("capsd_tasks_total", 0) == 0  # no task has ended there
            assert (tasks(other(fleet, stopping)), tasks(other(fleet, stopping), "tasks_failed")) == (8, 0)
            await ws.send(last)
            assert_exact((await receive(ws, {"long-file"}))["long-file"], text, starts)
            await asyncio.wait_for(ws.wait_closed(), 60)  # capsd closes it as its stop ends
            return stopping

    assert asyncio.run(scenario()).proc.wait(60) == 0


def test_a_killed_capsd_drops_its_connections_and_new_tasks_go_to_the_other(start_fleet: Callable[..., Fleet]) -> None:
    fleet, proxy = start_fleet()
    text = digits(180, 0)
    samples, starts = synth(text)  # 90 s files: a 60 s frame, then the last 30 s with is_final
    frames = {task_id: file_frames(task_id, samples) for task_id in ("dropped", "survives")}

    workers: list[int] = []

    async def scenario() -> None:
        async with connect(proxy.url) as dropped, AsyncExitStack() as stack:
            victim = await asyncio.to_thread(
                wait_for, lambda: the_one(fleet, lambda c: c.status()["connections"] == 1), 30, "connected"
            )
            survivor = other(fleet, victim)
            survives = await stack.enter_async_context(connect(proxy.url))  # leastconn: to the other
            await asyncio.to_thread(wait_for, lambda: survivor.status()["connections"] == 1, 30, "the other connected")
            await dropped.send(frames["dropped"][0])
            await survives.send(frames["survives"][0])
            await asyncio.to_thread(
                wait_for, lambda: all(tasks(c, "tasks_in_progress") for c in fleet), 30, "in progress"
            )
            status = victim.status()
            workers.extend([*(slot["pid"] for slot in status["slots"]), *(loader["pid"] for loader in status["loaders"])])
            victim.proc.kill()
            with pytest.raises(ConnectionClosed):
                await receive(dropped, {"dropped"}, timeout=30)  # its connection drops, no final frame
            await new_tasks(proxy.url, 6, "new")  # at once: HAProxy may still take it for up
            assert (tasks(survivor), tasks(survivor, "tasks_failed")) == (6, 0)
            await survives.send(frames["survives"][1])
            assert_exact((await receive(survives, {"survives"}))["survives"], text, starts)
            name = server(fleet, victim)
            await asyncio.to_thread(wait_for, lambda: proxy.state(name) == "DOWN", 30, "marked down")
            await asyncio.to_thread(wait_for, lambda: all(gone(pid) for pid in workers), 30, "its workers gone")

    try:
        asyncio.run(scenario())
    finally:
        for pid in workers:  # orphans of the killed capsd, should they outlive it
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
