"""The API process's view of the steering profiles and the routing probes: files, names, engine rows.

Each loaded profile occupies one row ("slot", 1..max_rows) of the engine's steering tables
(row 0 means no steering); each loaded probe one row of the engine's probe table. A deleted
or replaced item disappears from the name map at once (new requests cannot use it), but its
row is recycled only once no request that was admitted with it is still alive in the
engine: running requests keep what they started with. Which requests are alive is asked of
the engine client (`is_live`), so a request pinned here needs no release call, whatever way
it ends (finished, aborted, client gone, background task). `ProfileStore` and `ProbeStore`
are the same store over two kinds of file.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from unipool_serve.model_executor.steering.probe import RoutingProbe
from unipool_serve.model_executor.steering.profile import SteeringProfile, SteeringProfileError, check_name

logger = logging.getLogger("unipool_serve.server")

Item = SteeringProfile | RoutingProbe
PushFn = Callable[[int, Item | None], Awaitable[None]]


class ProfileStoreError(Exception):
    """A profile or probe operation that cannot be done; `code` names the case for clients."""

    code = "steering_error"


class UnknownProfile(ProfileStoreError):
    code = "unknown_steering_profile"


class ProfileExists(ProfileStoreError):
    code = "steering_profile_exists"


class SlotsFull(ProfileStoreError):
    code = "steering_slots_full"


@dataclass(eq=False)
class Loaded:
    """One loaded profile or probe and its engine row."""

    item: Item
    slot: int
    content_hash: str
    pinned_by: set[str] = field(default_factory=set)  # engine request ids admitted with it
    deleted: bool = False


@dataclass
class ProfileStore:
    """Profiles by name, backed by a folder of `<name>.safetensors` files (optional)."""

    config: object  # the served model: a SteerableModel, or a config it is read from (items are checked against it)
    max_profiles: int  # engine rows
    directory: Path | None = None
    push: PushFn | None = None  # writes (slot, item) into every worker's table; None clears
    is_live: Callable[[str], bool] = lambda request_id: False  # is this engine request still running?
    by_name: dict[str, Loaded] = field(default_factory=dict)
    retiring: list[Loaded] = field(default_factory=list)
    load_errors: dict[str, str] = field(default_factory=dict)

    item_class = SteeringProfile
    what, plural = "steering profile", "profiles"  # in messages
    codes = {"unknown": "unknown_steering_profile", "exists": "steering_profile_exists",
             "full": "steering_slots_full"}
    capacity_setting = "UNIPOOL_MAX_STEERING_PROFILES"

    # ---- start-up ----------------------------------------------------------
    async def load_directory(self) -> None:
        """Load every profile file; a bad file is reported and skipped, never fatal."""
        if self.directory is None:
            return
        for path in sorted(self.directory.glob("*.safetensors")):
            if path.name.startswith("."):
                continue
            try:
                item = self.item_class.load(path, self.config)
                if item.name != path.stem:
                    raise SteeringProfileError(f"{path}: file name must be <name>.safetensors (name is {item.name!r})")
                await self.add(item, persist=False)
            except (SteeringProfileError, ProfileStoreError, OSError) as exc:
                self.load_errors[path.name] = str(exc)
                logger.error("%s %s not loaded: %s", self.what, path, exc)

    # ---- requests ----------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.by_name)

    def get(self, name: str) -> Loaded:
        active = self.by_name.get(name)
        if active is None:
            error = UnknownProfile(f"unknown {self.what} {name!r}; available {self.plural}: {self.names()}")
            error.code = self.codes["unknown"]
            raise error
        return active

    def pin(self, active: Loaded, request_id: str) -> None:
        """Keep `active`'s row until engine request `request_id` has left the engine."""
        active.pinned_by.add(request_id)

    def running(self, active: Loaded) -> int:
        """How many admitted requests still run with this profile (forgets the finished ones)."""
        active.pinned_by = {r for r in active.pinned_by if self.is_live(r)}
        return len(active.pinned_by)

    # ---- admin -------------------------------------------------------------
    async def add(self, item: Item, *, persist: bool = True, replace: bool = False) -> Loaded:
        if not isinstance(item, self.item_class):
            raise SteeringProfileError(f"not a {self.what}")
        item.validate(self.config)
        if item.name in self.by_name and not replace:
            error = ProfileExists(f"{self.what} {item.name!r} already exists; DELETE it first "
                                  "(or upload with ?replace=true)")
            error.code = self.codes["exists"]
            raise error
        slot = await self._free_slot()
        if persist and self.directory is not None:
            item.save(self.directory / f"{item.name}.safetensors")
        if self.push is not None:
            await self.push(slot, item)
        if item.name in self.by_name:
            await self._retire(self.by_name.pop(item.name))
        active = Loaded(item, slot, item.content_hash())
        self.by_name[item.name] = active
        logger.info("%s %r loaded into slot %d", self.what, item.name, slot)
        return active

    async def remove(self, name: str) -> int:
        """Delete a profile; returns how many admitted requests still run with it."""
        check_name(name)
        active = self.get(name)
        if self.directory is not None:
            (self.directory / f"{name}.safetensors").unlink(missing_ok=True)
        del self.by_name[name]
        return await self._retire(active)

    async def _retire(self, active: Loaded) -> int:
        active.deleted = True
        running = self.running(active)
        if running:
            self.retiring.append(active)
        elif self.push is not None:
            await self.push(active.slot, None)
        return running

    async def release_finished(self) -> None:
        """Clear the rows of deleted or replaced profiles that no running request uses any more."""
        for active in [a for a in self.retiring if not self.running(a)]:
            self.retiring.remove(active)
            if self.push is not None:
                await self.push(active.slot, None)

    def rows_in_use(self) -> int:
        """Engine rows held: by the loaded profiles, and by deleted ones still running requests."""
        return len(self.by_name) + len(self.retiring)

    async def _free_slot(self) -> int:
        await self.release_finished()
        used = {a.slot for a in self.by_name.values()} | {a.slot for a in self.retiring}
        for slot in range(1, self.max_profiles + 1):
            if slot not in used:
                return slot
        error = SlotsFull(f"all {self.max_profiles} {self.what} slots are in use; delete one first "
                          f"(or start the server with a larger {self.capacity_setting})")
        error.code = self.codes["full"]
        raise error


@dataclass
class ProbeStore(ProfileStore):
    """Routing probes by name, backed by a folder of `<name>.safetensors` probe files (optional)."""

    item_class = RoutingProbe
    what, plural = "probe", "probes"
    unavailable: str | None = None  # why this engine cannot run probes (None: it can)
    codes = {"unknown": "unknown_probe", "exists": "probe_exists", "full": "probe_slots_full"}
    capacity_setting = "UNIPOOL_MAX_PROBES"
