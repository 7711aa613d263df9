"""How the server learns of new snapshots: announcements on Kafka when it can, polls of the store otherwise.

With --bootstrap-servers, a Follower reads the trainer's announcements and the registry loads each
announced version at once (tens of milliseconds after it is published); the store is then
listed only every --store-poll-s, as a safety net, and once each time following (re)starts.
Without Kafka, or while it is unreachable, the store is polled every --reload-interval-s.
"""

import asyncio
import contextlib
import logging
import time

from streamlearn.announcements import Announcement, Announcer, Follower
from streamlearn.config import ServeSettings
from streamlearn.errors import SnapshotStoreUnavailable
from streamlearn.metrics import ServerMetrics
from streamlearn.serve.registry import ModelRegistry

log = logging.getLogger("streamlearn.serve")


class Freshness:
    """Keeps the registry up to date: start() in the app's lifespan, stop() at its end."""

    def __init__(self, settings: ServeSettings, models: ModelRegistry, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.models = models
        self.metrics = metrics
        self.follower: Follower | None = None
        self.announcer: Announcer | None = None
        if settings.bootstrap_servers and settings.announce_topic:
            self.follower = Follower(
                settings.bootstrap_servers,
                settings.kafka,
                settings.announce_topic,
                self._announced,
                self._following,
                on_invalid=lambda: metrics.announcements.labels("invalid").inc(),
            )
            self.announcer = Announcer(settings.bootstrap_servers, settings.kafka, settings.announce_topic)
            metrics.following.labels(settings.announce_topic).set(0)
        self._catch_up = False  # following (re)started: look at the store once
        self._task: asyncio.Task[None] | None = None

    @property
    def following(self) -> bool:
        return self.follower is not None and self.follower.healthy

    def announce_serving(self, name: str) -> None:
        """Tell the other replicas that a model's serving state changed (a pin, an unpin)."""
        if self.announcer is not None:
            served = self.models.get(name)
            self.announcer.announce(
                Announcement(name, served.version, self.models.store.location, kind="serving")
            )

    async def start(self) -> None:
        await refresh(self.models)
        if self.follower is not None:
            self.follower.start()
        self._task = asyncio.create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.follower is not None:
            await asyncio.to_thread(self.follower.stop)
        if self.announcer is not None:
            await asyncio.to_thread(self.announcer.close, 1.0)

    async def _poll_forever(self) -> None:
        healthy, last = True, time.monotonic()
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            if self.following and not self._catch_up and time.monotonic() - last < self.settings.store_poll_s:
                continue
            self._catch_up = False
            healthy = await refresh(self.models, quiet=not healthy)
            last = time.monotonic()

    # -- on the follower's thread -----------------------------------------------------------------------

    def _announced(self, announcement: Announcement) -> None:
        if announcement.kind == "serving":
            served = self.models.refresh_model(announcement.model)
        else:
            served = self.models.offer(announcement.model, announcement.version)
        self.metrics.announcements.labels("served" if served is not None else "ignored").inc()

    def _following(self, healthy: bool) -> None:
        self.metrics.following.labels(self.settings.announce_topic).set(1 if healthy else 0)
        self._catch_up = self._catch_up or healthy


async def refresh(models: ModelRegistry, quiet: bool = False) -> bool:
    """Look at the store for new snapshots; an outage is logged once, when it starts, and again
    when it ends. Returns whether the store answered."""
    try:
        await asyncio.to_thread(models.refresh)
    except SnapshotStoreUnavailable as exc:  # keep serving the models we have, keep trying
        if not quiet:
            log.warning("%s; serving the loaded models until it is back", exc)
        return False
    except Exception:  # a bad directory state must never stop reloading
        log.exception("snapshot reload failed")
        return True
    if quiet:
        log.info("the snapshot store is reachable again")
    return True
