"""One gateway, assembled once: keys, quotas, the usage ledger, the app and the engine scraper.

``gpufleet up`` (``embedded``), ``gpufleet gateway`` (``cluster``), the benchmarks and the tests
that run a whole gateway all build it here, so each runs what users run. The caller owns the
control plane and the store: it starts the plane before ``start`` (the batch runner and the
scraper follow the fleet — a batch resumed before the models are known would fail its lines),
stops it after ``close`` (engines stop once the gateway has answered its last request), and
closes the store last (``close`` writes the ledger's last rows into it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpufleet.controller import ControlPlane
from gpufleet.gateway.app import build_app
from gpufleet.gateway.asgi import GatewayApp
from gpufleet.gateway.auth import Keyring
from gpufleet.gateway.batch_runner import BatchRunner
from gpufleet.gateway.ledger import Ledger
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.quotas import Quotas, make_quotas
from gpufleet.gateway.scraper import EngineScraper
from gpufleet.gateway.service import Gateway
from gpufleet.gateway.settings import GatewaySettings
from gpufleet.gateway.settle_journal import FILENAME as SETTLE_JOURNAL
from gpufleet.gateway.spool import Spool
from gpufleet.loop_watch import LoopWatch

__all__ = ["GatewayStack", "assemble"]


@dataclass(frozen=True)
class GatewayStack:
    """A gateway's parts, and their start and stop in order."""

    app: GatewayApp
    gateway: Gateway
    #: Present with auth off too (``gpufleet up --no-auth`` makes the default tenant with
    #: it); the app only uses it when ``keyring.enabled``.
    keyring: Keyring
    quotas: Quotas
    ledger: Ledger | None
    scraper: EngineScraper
    batches: BatchRunner
    #: The event loop's lag and stalls (what held it), on the gateway's ``/metrics``.
    watch: LoopWatch

    async def start(self) -> None:
        """The loop's watch, keys read, then the ledger's writer, the quotas' settlements left
        by a previous process (their journal is in the spool's directory, taken by the ledger),
        the engine scraper and the batch runner."""
        self.watch.start()
        if self.keyring.enabled:
            await self.keyring.start()
        if self.ledger is not None:
            self.ledger.start()
        await self.quotas.start()
        self.scraper.start()
        self.batches.start()

    async def close(self) -> None:
        """The other way: scraping and batches stop, requests' settlements land, the ledger
        writes its last rows, then keys, quotas and engine connections close. Safe after a
        partial ``start``, or none."""
        await self.scraper.close()
        await self.app.state.close()
        if self.ledger is not None:
            await self.ledger.close()
        await self.keyring.close()
        await self.quotas.close()
        await self.gateway.upstream.close()
        self.watch.close()


def assemble(
    plane: ControlPlane,
    settings: GatewaySettings | None = None,
    *,
    auth: bool = True,
    record_usage: bool = True,
    quotas: Quotas | None = None,
    metrics: GatewayMetrics | None = None,
    key_refresh_s: float = 0.5,
    ledger_flush_s: float = 0.5,
    ledger_spool: Path | None = None,
    scrape_s: float = 0.25,
) -> GatewayStack:
    """The gateway in front of ``plane``, on the plane's store.

    ``auth=False`` is the explicit ``--no-auth`` mode (every caller an admin of the default
    tenant); ``record_usage=False`` writes no ledger rows (a benchmark's bare baseline).
    ``ledger_spool``: the directory of the ledger's local spool (rows survive a SIGKILL of the
    process there; None keeps them in memory until written). Quota settlements Redis cannot
    take are kept in the same directory until it does, across a restart too.
    Quota counters live in ``settings.redis_url`` when set (as prefix hints do), in process
    otherwise; ``quotas`` replaces them (tests give a Redis namespace of their own)."""
    settings = settings or GatewaySettings()
    store = plane.store
    keyring = Keyring(store, enabled=auth, refresh_s=key_refresh_s)
    journal = ledger_spool / SETTLE_JOURNAL if ledger_spool is not None else None
    quotas = quotas or make_quotas(
        settings.redis_url,
        timeout_s=settings.redis_timeout_s,
        journal=journal,
        lease_s=settings.quota_lease_s,
    )
    spool = Spool(ledger_spool) if ledger_spool is not None else None
    ledger = Ledger(store, spool=spool, flush_s=ledger_flush_s) if record_usage else None
    app = build_app(
        plane,
        settings=settings,
        metrics=metrics,
        keyring=keyring if auth else None,
        quotas=quotas,
        ledger=ledger,
    )
    gateway: Gateway = app.state.gateway
    # Here, not at the top: quotas_redis is loaded on its own too (as make_quotas loads it).
    from gpufleet.gateway.quotas_redis import RedisQuotas

    if isinstance(quotas, RedisQuotas):  # one Redis outage report: admissions', settlements'
        quotas.pending.outages = gateway.outages
    scraper = EngineScraper(
        plane.directory,
        gateway.upstream,
        interval_s=scrape_s,
        on_tick=gateway.queues.poke_all,
        precise=gateway.upstream.precise,
    )
    gateway.metrics.engine_scrape_pause.set_function(lambda: scraper.pause)
    watch = LoopWatch(gateway.metrics.registry)
    return GatewayStack(app, gateway, keyring, quotas, ledger, scraper, app.state.batches, watch)
