"""The engine scraper keeps to its share of the event loop: many replicas are scraped less
often rather than a pass every 250 ms holding the loop (found with 960 replicas behind the
console's fleet bench)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from gpufleet.controller import Directory
from gpufleet.gateway.scraper import EngineScraper


class Loads:
    def __init__(self) -> None:
        self.loads: dict[str, Any] = {}

    def forget(self, rid: str) -> None:
        self.loads.pop(rid, None)


def scraper(**kwargs: Any) -> EngineScraper:
    return EngineScraper(Directory(), Loads(), interval_s=0.25, **kwargs)  # type: ignore[arg-type]


def test_a_cheap_pass_keeps_the_interval_and_a_costly_one_keeps_to_the_budget() -> None:
    s = scraper(budget=0.1)
    assert s.pace(took_s=0.005, cpu_s=0.004) == 0.25
    # 150 ms of the loop's CPU in a 200 ms pass: the pass and its pause together last 1.5 s,
    # so scraping holds a tenth of the loop.
    pause = s.pace(took_s=0.2, cpu_s=0.15)
    assert pause == pytest.approx(1.3)
    assert 0.15 / (0.2 + pause) == pytest.approx(0.1)
    # A pass that waited on slow engines but cost little CPU is not held against them.
    assert s.pace(took_s=0.2, cpu_s=0.01) == 0.25


def test_slowing_down_and_coming_back_are_each_said_once(caplog: pytest.LogCaptureFixture) -> None:
    s = scraper(budget=0.1)
    with caplog.at_level(logging.INFO, logger="gpufleet.gateway.scraper"):
        for _ in range(3):
            s.pace(took_s=0.2, cpu_s=0.15)
        for _ in range(3):
            s.pace(took_s=0.005, cpu_s=0.004)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2
    assert "every 1.50 s instead of 0.25 s" in said[0] and "10% of the event loop" in said[0]
    assert said[1] == "engine scraping is back to every 0.25 s"


async def test_the_loop_pauses_as_the_passes_cost() -> None:
    """The running loop measures each pass on its clocks and sleeps the paced pause."""
    now = {"wall": 0.0, "cpu": 0.0}
    costs = iter([(0.01, 0.005), (0.3, 0.25), (0.01, 0.005)])  # (wall, cpu) of each pass
    pauses: list[float] = []
    done = asyncio.Event()

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 3:
            done.set()
            await asyncio.Event().wait()  # the test ends the loop here

    s = scraper(budget=0.1, clock=lambda: now["wall"], cpu_clock=lambda: now["cpu"], sleep=sleep)

    async def scrape_once() -> None:
        wall, cpu = next(costs)
        now["wall"] += wall
        now["cpu"] += cpu

    s.scrape_once = scrape_once  # type: ignore[method-assign]
    s.start()
    try:
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await s.close()
    assert pauses == [0.25, pytest.approx(2.2), 0.25]


def test_the_budget_is_a_share_of_the_loop() -> None:
    with pytest.raises(ValueError, match="share of the loop"):
        scraper(budget=0)
