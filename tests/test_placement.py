"""Role placement (planning.placement): priority, VRAM packing, sharing, failover, the hold, in the pure function.

The roles are the dual-gpu-roles example's, loaded from the example itself; the end-to-end behaviour
(the fake NVML, fakepve, a real Docker engine) is in tests/test_gpu_roles_real.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.planning.placement import Ask, GpuState, Pinned, place, vm_holds_by_priority
from reconciler.spec.models import GpuRole, Sharing
from reconciler.spec.validate import load_and_validate

GIB = 1024**3
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "dual-gpu-roles"


@pytest.fixture(scope="module")
def roles() -> dict[str, GpuRole]:
    return {role.name: role for role in load_and_validate(EXAMPLE).state.of(GpuRole)}


def _gpus(*, big_taken: str | None = None, small_lost: bool = False) -> list[GpuState]:
    return [
        GpuState("gtx970", "transcode", 4 * GIB, lost=small_lost),
        GpuState("rtx5070ti", "primary", 16 * GIB, taken_by=big_taken),
    ]


def _transcoders(now: tuple[str, ...] = (), ran_for: float | None = None) -> list[Ask]:
    return [
        Ask(name, "transcode", "pve", {"gtx970": GIB, "rtx5070ti": GIB}, now, ran_for) for name in ("jellyfin", "plex")
    ]


OLLAMA = Ask("ollama", "primary", "pve", {"gtx970": 12 * GIB, "rtx5070ti": 12 * GIB})


def test_transcoding_uses_the_free_big_gpu_and_never_sits_beside_ollama(roles: dict[str, GpuRole]) -> None:
    free = place(_gpus(), roles, _transcoders())
    assert {seat.gpus for seat in free.values()} == {("rtx5070ti",)}
    with_ollama = place(_gpus(), roles, [*_transcoders(), OLLAMA])
    assert with_ollama["ollama"].gpus == ("rtx5070ti",)
    assert with_ollama["plex"].gpus == ("gtx970",) and with_ollama["jellyfin"].gpus == ("gtx970",)
    assert "rtx5070ti holds ollama (role primary, exclusive)" in (with_ollama["plex"].why or "")


def test_when_the_small_gpu_is_lost_beside_ollama_transcoding_stops_saying_why(roles: dict[str, GpuRole]) -> None:
    seats = place(_gpus(small_lost=True), roles, [*_transcoders(now=("gtx970",)), OLLAMA])
    plex = seats["plex"]
    assert plex.gpus == () and plex.moved
    assert plex.why is not None and "gtx970 is lost" in plex.why and "holds ollama" in plex.why


def test_the_gaming_vm_takes_the_big_gpu_and_transcoding_moves_at_once(roles: dict[str, GpuRole]) -> None:
    seats = place(_gpus(big_taken="gaming"), roles, _transcoders(now=("rtx5070ti",), ran_for=5.0))
    plex = seats["plex"]
    assert plex.gpus == ("gtx970",) and plex.moved, "a GPU taken is left at once, whatever the hold"
    assert plex.why is not None and "passed through to the running VM gaming" in plex.why


def test_moving_back_waits_for_the_hold_then_happens(roles: dict[str, GpuRole]) -> None:
    hold = roles["transcode"].hold
    held = place(_gpus(), roles, _transcoders(now=("gtx970",), ran_for=hold - 60))
    assert held["plex"].gpus == ("gtx970",) and not held["plex"].moved
    assert "hold" in (held["plex"].why or "") and "60 s left" in (held["plex"].why or "")
    back = place(_gpus(), roles, _transcoders(now=("gtx970",), ran_for=hold))
    assert back["plex"].gpus == ("rtx5070ti",) and back["plex"].moved
    unknown = place(_gpus(), roles, _transcoders(now=("gtx970",), ran_for=None))
    assert unknown["plex"].gpus == ("rtx5070ti",), "no start time observed: nothing to hold on"


def test_priority_places_the_higher_role_first_whatever_the_names(roles: dict[str, GpuRole]) -> None:
    low = Ask("a-transcoder", "transcode", "pve", {"gtx970": GIB, "rtx5070ti": GIB})
    seats = place(_gpus(small_lost=True), roles, [low, OLLAMA])
    assert seats["ollama"].gpus == ("rtx5070ti",) and seats["a-transcoder"].gpus == ()


def test_packing_by_vram_fit_not_by_name() -> None:
    pool = {"pool": GpuRole(name="pool", sharing=Sharing.SHARED)}
    gpus = [GpuState("a", "pool", 24 * GIB), GpuState("b", "pool", 24 * GIB)]
    pinned = [Pinned("big", ("b",), 16 * GIB)]
    seats = place(gpus, pool, [Ask("small", "pool", "h", {"a": 6 * GIB, "b": 6 * GIB})], pinned)
    assert seats["small"].gpus == ("b",), "the fullest GPU that still fits, leaving 'a' whole"
    seats = place(gpus, pool, [Ask("large", "pool", "h", {"a": 12 * GIB, "b": 12 * GIB})], pinned)
    assert seats["large"].gpus == ("a",)
    assert "b has 8.0 GiB left, large needs 12.0 GiB" in (seats["large"].why or "")


def test_an_exclusive_roles_gpu_takes_nothing_else() -> None:
    roles = {
        "solo": GpuRole(name="solo", priority=10, failover=("b",)),
        "pool": GpuRole(name="pool", sharing=Sharing.SHARED, failover=("a",)),
    }
    gpus = [GpuState("a", "solo", 24 * GIB), GpuState("b", "pool", 24 * GIB)]
    asks = [Ask(n, "solo", "h", {"a": GIB, "b": GIB}) for n in ("one", "two", "three")]
    seats = place(gpus, roles, asks)
    assert [seats[n].gpus for n in ("one", "three", "two")] == [("a",), ("b",), ("b",)], "b is shared: both fit"
    assert "a holds one (role solo, exclusive)" in (seats["three"].why or "")
    # While its own work is not there, the exclusive GPU lends itself to the work of one other role.
    pool = [Ask(n, "pool", "h", {"a": GIB, "b": 30 * GIB}) for n in ("p1", "p2")]
    seats = place(gpus, roles, pool)
    assert seats["p1"].gpus == ("a",) and seats["p2"].gpus == ("a",)
    seats = place(gpus, roles, [*pool, Ask("one", "solo", "h", {"a": GIB, "b": GIB})])
    assert seats["one"].gpus == ("a",) and seats["p1"].gpus == () and "holds one" in (seats["p1"].why or "")


def test_the_same_input_gives_the_same_seats(roles: dict[str, GpuRole]) -> None:
    asks = [*_transcoders(now=("gtx970",), ran_for=3.0), OLLAMA]
    assert place(_gpus(), roles, asks) == place(_gpus(), roles, list(reversed(asks)))


def test_a_hand_started_vm_is_kept_unless_a_strictly_higher_priority_needs_its_gpu() -> None:
    assert vm_holds_by_priority(100, [100, 10])
    assert not vm_holds_by_priority(100, [101])
    assert vm_holds_by_priority(0, [])
