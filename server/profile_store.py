"""The API process's view of the steering profiles: files, names, engine table slots.

Each loaded profile occupies one row ("slot", 1..max_profiles) of the engine's steering
tables; row 0 means no steering. A deleted or replaced profile disappears from the name
map at once (new requests cannot use it), but its row is recycled only once no request
that was admitted with it is still alive in the engine: running requests keep the
profile they started with. Which requests are alive is asked of the engine client
(`is_live`), so a request pinned here needs no release call, whatever way it ends
(finished, aborted, client gone, background task).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from unipool_serve.model_executor.steering.profile import SteeringProfile, SteeringProfileError, check_name

logger = logging.getLogger("unipool_serve.server")

PushFn = Callable[[int, SteeringProfile | None], Awaitable[None]]


class ProfileStoreError(Exception):
    """A profile operation that cannot be done; `code` names the case for clients."""

    code = "steering_error"


class UnknownProfile(ProfileStoreError):
    code = "unknown_steering_profile"


class ProfileExists(ProfileStoreError):
    code = "steering_profile_exists"


class SlotsFull(ProfileStoreError):
    code = "steering_slots_full"


@dataclass(eq=False)
class ActiveProfile:
    profile: SteeringProfile
    slot: int
    content_hash: str
    pinned_by: set[str] = field(default_factory=set)  # engine request ids admitted with it
    deleted: bool = False


@dataclass
class ProfileStore:
    """Profiles by name, backed by a folder of `<name>.safetensors` files (optional)."""

    config: object  # the served model: a SteerableModel, or a config it is read from (profiles are checked against it)
    max_profiles: int
    directory: Path | None = None
    push: PushFn | None = None  # writes (slot, profile) into every worker's table; None clears
    is_live: Callable[[str], bool] = lambda request_id: False  # is this engine request still running?
    by_name: dict[str, ActiveProfile] = field(default_factory=dict)
    retiring: list[ActiveProfile] = field(default_factory=list)
    load_errors: dict[str, str] = field(default_factory=dict)

    # ---- start-up ----------------------------------------------------------
    async def load_directory(self) -> None:
        """Load every profile file; a bad file is reported and skipped, never fatal."""
        if self.directory is None:
            return
        for path in sorted(self.directory.glob("*.safetensors")):
            if path.name.startswith("."):
                continue
            try:
                profile = SteeringProfile.load(path, self.config)
                if profile.name != path.stem:
                    raise SteeringProfileError(f"{path}: file name must be <name>.safetensors (name is {profile.name!r})")
                await self.add(profile, persist=False)
            except (SteeringProfileError, ProfileStoreError, OSError) as exc:
                self.load_errors[path.name] = str(exc)
                logger.error("steering profile %s not loaded: %s", path, exc)

    # ---- requests ----------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.by_name)

    def get(self, name: str) -> ActiveProfile:
        active = self.by_name.get(name)
        if active is None:
            raise UnknownProfile(f"unknown steering profile {name!r}; available profiles: {self.names()}")
        return active

    def pin(self, active: ActiveProfile, request_id: str) -> None:
        """Keep `active`'s row until engine request `request_id` has left the engine."""
        active.pinned_by.add(request_id)

    def running(self, active: ActiveProfile) -> int:
        """How many admitted requests still run with this profile (forgets the finished ones)."""
        active.pinned_by = {r for r in active.pinned_by if self.is_live(r)}
        return len(active.pinned_by)

    # ---- admin -------------------------------------------------------------
    async def add(self, profile: SteeringProfile, *, persist: bool = True, replace: bool = False) -> ActiveProfile:
        profile.validate(self.config)
        if profile.name in self.by_name and not replace:
            raise ProfileExists(f"steering profile {profile.name!r} already exists; DELETE it first "
                                "(or upload with ?replace=true)")
        slot = await self._free_slot()
        if persist and self.directory is not None:
            profile.save(self.directory / f"{profile.name}.safetensors")
        if self.push is not None:
            await self.push(slot, profile)
        if profile.name in self.by_name:
            await self._retire(self.by_name.pop(profile.name))
        active = ActiveProfile(profile, slot, profile.content_hash())
        self.by_name[profile.name] = active
        logger.info("steering profile %r loaded into slot %d", profile.name, slot)
        return active

    async def remove(self, name: str) -> int:
        """Delete a profile; returns how many admitted requests still run with it."""
        check_name(name)
        active = self.get(name)
        if self.directory is not None:
            (self.directory / f"{name}.safetensors").unlink(missing_ok=True)
        del self.by_name[name]
        return await self._retire(active)

    async def _retire(self, active: ActiveProfile) -> int:
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
        raise SlotsFull(f"all {self.max_profiles} steering slots are in use; delete a profile first "
                        "(or start the server with a larger UNIPOOL_MAX_STEERING_PROFILES)")
