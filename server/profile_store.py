"""The API process's view of the steering profiles: files, names, engine table slots.

Each loaded profile occupies one row ("slot", 1..max_profiles) of the engine's
steering tables; row 0 means no steering. A deleted profile disappears from the
name map at once (new requests cannot use it), but its row is only recycled once
every request that started with it has finished: running requests keep the
profile they started with.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from unipool_serve.model_executor.steering_profile import SteeringProfile, SteeringProfileError, check_name

from .errors import APIError

logger = logging.getLogger("unipool_serve.server")

PushFn = Callable[[int, SteeringProfile | None], Awaitable[None]]


@dataclass
class ActiveProfile:
    profile: SteeringProfile
    slot: int
    content_hash: str
    in_flight: int = 0
    deleted: bool = False


@dataclass
class ProfileStore:
    """Profiles by name, backed by a folder of `<name>.safetensors` files (optional)."""

    config: object  # UniPoolConfig of the served model
    max_profiles: int
    directory: Path | None = None
    push: PushFn | None = None  # writes (slot, profile) into every worker's table; None clears
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
            except (SteeringProfileError, APIError, OSError) as exc:
                message = getattr(exc, "message", str(exc))
                self.load_errors[path.name] = message
                logger.error("steering profile %s not loaded: %s", path, message)

    # ---- requests ----------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.by_name)

    def get(self, name: str) -> ActiveProfile:
        active = self.by_name.get(name)
        if active is None:
            raise APIError(404, f"steering profile {name!r} not found; available: {self.names()}",
                           param="steering", code="steering_profile_not_found")
        return active

    def acquire(self, name: str) -> ActiveProfile:
        """Pin a profile for one request (its slot is not recycled until `release`)."""
        active = self.by_name.get(name)
        if active is None:
            raise APIError(400, f"unknown steering profile {name!r}; available profiles: {self.names()}",
                           param="steering", code="unknown_steering_profile")
        active.in_flight += 1
        return active

    async def release(self, active: ActiveProfile) -> None:
        active.in_flight -= 1
        if active.deleted and active.in_flight == 0:
            await self._free(active)

    # ---- admin -------------------------------------------------------------
    async def add(self, profile: SteeringProfile, *, persist: bool = True, replace: bool = False) -> ActiveProfile:
        profile.validate(self.config)
        if profile.name in self.by_name and not replace:
            raise APIError(409, f"steering profile {profile.name!r} already exists; DELETE it first",
                           param="name", code="steering_profile_exists")
        slot = self._free_slot()
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

    async def remove(self, name: str) -> None:
        check_name(name)
        active = self.get(name)
        if self.directory is not None:
            (self.directory / f"{name}.safetensors").unlink(missing_ok=True)
        del self.by_name[name]
        await self._retire(active)

    async def _retire(self, active: ActiveProfile) -> None:
        active.deleted = True
        if active.in_flight == 0:
            await self._free(active)
        else:
            self.retiring.append(active)

    async def _free(self, active: ActiveProfile) -> None:
        if active in self.retiring:
            self.retiring.remove(active)
        if self.push is not None:
            await self.push(active.slot, None)

    def _free_slot(self) -> int:
        used = {a.slot for a in self.by_name.values()} | {a.slot for a in self.retiring}
        for slot in range(1, self.max_profiles + 1):
            if slot not in used:
                return slot
        raise APIError(409, f"all {self.max_profiles} steering slots are in use; delete a profile first "
                       "(or start the server with a larger UNIPOOL_MAX_STEERING_PROFILES)", code="steering_slots_full")
