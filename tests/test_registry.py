"""The etcd registry: leases, live views, and surviving an etcd restart."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluice.local.stores import StoreProcess, etcd_process, free_port
from sluice.runtime.registry import PrefixView, Registration, etcd_client
from tests.harness import eventually

PREFIX = "/sluice/test/"


def decode(raw: bytes) -> str:
    return raw.decode()


async def test_view_follows_puts_deletes_and_lease_expiry(etcd: str) -> None:
    """A view sees registrations appear, update, vanish on revoke, and vanish on expiry."""
    client = etcd_client(etcd)
    view: PrefixView[str] = PrefixView(client, PREFIX, decode)
    await view.start()
    a = Registration(client, PREFIX + "a", b"v1", ttl_s=2)
    b = Registration(client, PREFIX + "b", b"v1", ttl_s=2)
    await a.start()
    await b.start()
    await eventually(lambda: view.items() == {"a": "v1", "b": "v1"})
    await a.update(b"v2")
    await eventually(lambda: view.get("a") == "v2")
    await a.stop()
    await eventually(lambda: view.get("a") is None, timeout=0.5)
    b.abandon()  # as if its process died
    await eventually(lambda: view.get("b") is None, timeout=2 + 1.5)
    await view.stop()
    await client.close()


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[StoreProcess]:
    """An etcd of this test's own, so it can be restarted."""
    proc = etcd_process(tmp_path / "data", tmp_path / "etcd.log").start()
    yield proc
    proc.stop()


def _restart(proc: StoreProcess, wipe: Path | None = None) -> None:
    proc.stop()
    if wipe is not None:
        shutil.rmtree(wipe)
    proc.start()


@pytest.mark.parametrize("wipe_data", [False, True], ids=["same-data", "data-lost"])
async def test_registration_and_view_survive_etcd_restart(
    private_etcd: StoreProcess, tmp_path: Path, wipe_data: bool
) -> None:
    """After etcd restarts (even with its data lost) the entry is back and the view, never
    restarted, shows it and later changes again."""
    client = etcd_client(private_etcd.address)
    watcher = etcd_client(private_etcd.address)
    view: PrefixView[str] = PrefixView(watcher, PREFIX, decode, resync_interval_s=1.0)
    await view.start()
    reg = Registration(client, PREFIX + "node", b"up", ttl_s=2)
    await reg.start()
    await eventually(lambda: view.get("node") == "up")

    _restart(private_etcd, wipe=tmp_path / "data" if wipe_data else None)

    if wipe_data:  # the lease died with the data: the keepalive must register again
        await eventually(lambda: reg.registrations >= 2, timeout=15)
    later = Registration(client, PREFIX + "later", b"new", ttl_s=2)
    await eventually_started(later)
    await eventually(lambda: view.get("later") == "new", timeout=15)
    stored = await client.get((PREFIX + "node").encode())
    assert stored is not None and stored.value == b"up"
    assert view.get("node") == "up"
    await reg.stop()
    await eventually(lambda: view.get("node") is None, timeout=5)
    await later.stop()
    await view.stop()
    await client.close()
    await watcher.close()


async def eventually_started(reg: Registration, attempts: int = 50) -> None:
    """Start a registration, retrying while the client reconnects."""
    for _ in range(attempts):
        try:
            await reg.start()
            return
        except Exception:
            await asyncio.sleep(0.2)
    raise AssertionError("could not register after the restart")


async def test_registration_and_view_started_before_etcd_catch_up_when_it_appears(
    tmp_path: Path,
) -> None:
    """With nothing on the etcd port, ``start`` still raises by default; with
    ``retry_in_background`` (and a view's ``within_s``) it returns False at once, and both catch
    up when etcd starts: the key is put, the view reads it."""
    proc = etcd_process(tmp_path / "data", tmp_path / "etcd.log", port=free_port())
    client = etcd_client(proc.address)
    view: PrefixView[str] = PrefixView(client, PREFIX, decode)
    reg = Registration(client, PREFIX + "late", b"up", ttl_s=2)
    try:
        with pytest.raises(Exception, match="connect"):
            await Registration(client, PREFIX + "eager", b"x", ttl_s=2).start()
        async with asyncio.timeout(2):
            assert not await view.start(within_s=5)
            assert not await reg.start(retry_in_background=True)
        assert "ConnectionFailed" in view.last_error and "ConnectionFailed" in reg.last_error
        await asyncio.to_thread(proc.start)
        await eventually(lambda: reg.registered.is_set() and view.synced.is_set(), timeout=10)
        await eventually(lambda: view.get("late") == "up", timeout=10)
        assert reg.last_error == "" and view.last_error == ""
    finally:
        await reg.stop()
        await view.stop()
        await client.close()
        proc.stop()
