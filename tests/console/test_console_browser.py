"""The steering console in a real browser: headless Chromium (Debian's `chromium`, installed by
scripts/setup-tools.sh) driven by Playwright (the `dev` extra) against a live `unipool-serve` on the
bundled demo model, with a plain key, a key bound to `prose` and the admin key.

The page is used as a person would: type the key, pick the columns' profiles, Run, read the texts,
heatmaps and messages. Its own script runs under its strict CSP (no eval, no inline code): the
test waits by polling with `page.evaluate` (which the CSP does not govern) rather than
`wait_for_function` (which evaluates its predicate inside the page, and the CSP refuses that), and
fails on any CSP violation or uncaught error the page reports.

`CONSOLE_SCREENSHOT=docs/img/console.png pytest tests/console/test_console_browser.py` also writes
the admin view after a run there (the screenshot in docs/console.md and the README).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from server_launcher import run_server

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "unipool-demo"
CHROMIUM = "/usr/bin/chromium"
# The machine's network is closed: without these Chromium keeps trying hosts of its own (updates,
# sync, field trials) and fails.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
USER_KEY, BOUND_KEY, ADMIN_KEY = "console-user-key", "console-prose-key", "console-admin-key"
PROMPT = "def count_rivers():"
TOKENS = 32
LAYERS, EXPERTS = 4, 16  # the demo model
WAIT_S = 600


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The demo model with three keys; its profiles copied, so uploads never touch the repository."""
    folder = tmp_path_factory.mktemp("console-server")
    shutil.copytree(DEMO / "steering", folder / "steering")
    with run_server(["--enforce-eager", "--max-num-seqs", "8", "--steering-dir", str(folder / "steering"),
                     "--api-key", USER_KEY, "--api-key", f"{BOUND_KEY}=prose", "--admin-key", ADMIN_KEY],
                    folder / "server.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
        yield server
        log = server.log.read_text(errors="replace")
    assert not [k for k in (USER_KEY, BOUND_KEY, ADMIN_KEY) if k in log], "a key reached the server log"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # the dev extra; Chromium from scripts/setup-tools.sh

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: run scripts/setup-tools.sh (Debian's chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


class Console:
    """The page, with what it reported: console messages and uncaught errors."""

    def __init__(self, page, url: str):
        self.page, self.url, self.problems = page, url, []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        page.goto(f"{url}/console")
        self.wait("document.body.dataset.refreshes", "the page's first calls")

    def _console(self, message) -> None:
        if "Content Security Policy" in message.text or "Refused to" in message.text:
            self.problems.append(f"CSP: {message.text}")

    def wait(self, expression: str, what: str, timeout: float = WAIT_S):
        """Poll `expression` in the page until it is truthy (page.evaluate: not subject to the page's CSP)."""
        deadline = time.monotonic() + timeout
        while not (value := self.page.evaluate(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)
        return value

    def use_key(self, key: str) -> None:
        """Type the key and wait until the page has asked the API with it (whatever the answer)."""
        before = self.page.evaluate("document.body.dataset.refreshes || '0'")
        self.page.fill("#key", key)
        self.page.click("#key-use")
        self.wait(f"(document.body.dataset.refreshes || '0') !== '{before}'", "the page's calls with the key")

    def columns(self):
        return self.page.locator(".column")

    def profile_options(self) -> list[list[str]]:
        return self.page.evaluate("[...document.querySelectorAll('.column .profile')]"
                                  ".map(s => [...s.options].map(o => o.value))")

    def run(self) -> list[dict]:
        """Run, wait until the page has shown all it shows after a run (the columns' texts and maps, and
        the profile tables it asks for afterwards), and return what each column shows."""
        before = self.page.evaluate("document.body.dataset.runs || '0'")
        self.page.click("#run")
        self.wait(f"(document.body.dataset.runs || '0') !== '{before}'", "the run and what it shows")
        assert self.page.evaluate("[...document.querySelectorAll('.column')]"
                                  ".every(c => ['done', 'error'].includes(c.dataset.state))")
        return self.page.evaluate("""[...document.querySelectorAll('.column')].map(c => ({
            state: c.dataset.state,
            text: c.querySelector('.text').textContent,
            error: c.querySelector('.error').hidden ? null : c.querySelector('.error').textContent,
            notes: [...c.querySelectorAll('.maps > .note')].map(n => n.textContent),
            maps: [...c.querySelectorAll('canvas')].map(m => ({
                kind: m.dataset.kind, layers: Number(m.dataset.layers), experts: Number(m.dataset.experts),
                nonzero: Number(m.dataset.nonzero), drawn: m.dataset.drawn === 'true',
                painted: (() => { const d = m.getContext('2d').getImageData(0, 0, m.width, m.height).data;
                                  let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i + 1] < 250) n++;
                                  return n; })(),
            })),
        }))""")

    def set_prompt(self, max_tokens: int = TOKENS) -> None:
        self.page.select_option("#mode", "completion")
        self.page.fill("#prompt", PROMPT)
        self.page.fill("#max-tokens", str(max_tokens))
        self.page.fill("#min-tokens", str(max_tokens))
        self.page.fill("#temperature", "0")

    def set_column(self, index: int, profile: str, budget: str = "", manual: str = "") -> None:
        column = self.columns().nth(index)
        column.locator(".profile").select_option(profile)
        column.locator(".budget").fill(budget)
        is_open = column.locator(".manual").evaluate("details => details.open")
        if manual and not is_open:
            column.locator(".manual summary").click()
        if manual or is_open:
            column.locator(".manual-profile").fill(manual)

    def check_clean(self) -> None:
        assert self.problems == [], self.problems
        assert self.page.evaluate("localStorage.length") == 0
        for key in (USER_KEY, BOUND_KEY, ADMIN_KEY):
            assert key not in self.page.url


@pytest.fixture
def console(browser, served):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = Console(context.new_page(), served.url)
    yield page
    context.close()


def _direct(url: str, key: str, **fields) -> dict:
    body = {"model": "unipool-demo", "prompt": PROMPT, "max_tokens": TOKENS, "min_tokens": TOKENS, "temperature": 0,
            **fields}
    resp = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=600)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]


def _maps(column: dict) -> dict[str, dict]:
    return {m["kind"]: m for m in column["maps"]}


def _routed_cells(choice: dict) -> int:
    """Layer x expert cells with any token, from a response's routed_experts."""
    experts = np.load(io.BytesIO(base64.b64decode(choice["routed_experts"])))
    return len({(layer, int(e)) for row in experts for layer, slots in enumerate(row) for e in slots if e < EXPERTS})


def test_unsteered_and_prose_side_by_side(console, served, tmp_path):
    console.use_key(USER_KEY)
    assert console.page.evaluate("sessionStorage.getItem('unipool-console-key')") == USER_KEY
    assert console.profile_options() == [["", "code", "prose"]] * 2
    console.set_prompt()
    console.set_column(0, "")
    console.set_column(1, "prose")
    plain, prose = console.run()
    assert plain["state"] == prose["state"] == "done", (plain, prose)
    assert plain["text"] and prose["text"] and plain["text"] != prose["text"]
    # the page asked what it says it asked: the same texts and routing through the API directly
    direct_plain = _direct(served.url, USER_KEY, return_routed_experts=True)
    direct_prose = _direct(served.url, USER_KEY, steering="prose", return_routed_experts=True)
    assert (plain["text"], prose["text"]) == (direct_plain["text"], direct_prose["text"])
    for column, direct, kinds in ((plain, direct_plain, {"routing"}), (prose, direct_prose, {"routing", "diff"})):
        maps = _maps(column)
        assert set(maps) == kinds, maps  # a plain key sees no profile tables...
        for kind in kinds:
            assert maps[kind]["drawn"] and maps[kind]["painted"] > 0
            assert (maps[kind]["layers"], maps[kind]["experts"]) == (LAYERS, EXPERTS)
        assert maps["routing"]["nonzero"] == _routed_cells(direct)
    assert maps["diff"]["nonzero"] > 0
    # ...and says why, in words (the API's 403 envelope)
    assert any("HTTP 403" in note and "admin key" in note for note in prose["notes"]), prose["notes"]
    usage = console.wait("(() => { const m = document.querySelector('#usage canvas');"
                         " return m && [Number(m.dataset.rows), Number(m.dataset.cols)]; })()", "the usage map")
    assert usage == [1, EXPERTS]  # the demo has one pool of 16 experts
    console.page.screenshot(path=str(tmp_path / "console.png"), full_page=True)
    console.check_clean()


def test_the_admin_key_sees_profile_tables_and_manages_profiles(console, tmp_path):
    from unipool_serve.model_executor.config import UniPoolConfig
    from unipool_serve.model_executor.steering.profile import SteeringProfile

    console.use_key(ADMIN_KEY)
    console.set_prompt()
    console.set_column(0, "")
    console.set_column(1, "prose")
    plain, prose = console.run()
    assert plain["state"] == prose["state"] == "done"
    maps = _maps(prose)
    assert {"routing", "diff", "bias", "mask"} <= set(maps)
    for kind in ("bias", "mask"):
        assert (maps[kind]["layers"], maps[kind]["experts"]) == (LAYERS, EXPERTS) and maps[kind]["nonzero"] > 0
    console.page.screenshot(path=str(tmp_path / "console-admin.png"), full_page=True)
    if target := os.environ.get("CONSOLE_SCREENSHOT"):
        console.page.screenshot(path=target, full_page=True)

    # upload and delete through the page
    profile = SteeringProfile.for_config(UniPoolConfig.from_pretrained(str(DEMO)), name="console-upload",
                                         include={0: [3]}, description="uploaded by the console test")
    file = profile.save(tmp_path / "console-upload.safetensors")
    console.page.click("#admin summary")
    console.page.set_input_files("#upload-file", str(file))
    console.page.click("#upload")
    console.wait("document.querySelector('#admin-result').textContent.includes('uploaded')", "the upload")
    assert ["", "code", "console-upload", "prose"] in console.profile_options()
    console.page.select_option("#delete-name", "console-upload")
    console.page.once("dialog", lambda dialog: dialog.accept())
    console.page.click("#delete")
    console.wait("document.querySelector('#admin-result').textContent.includes('deleted')", "the delete")
    assert console.profile_options() == [["", "code", "prose"]] * 2

    # the same actions with a user key: the API refuses them, and the page says so
    console.use_key(USER_KEY)
    console.page.set_input_files("#upload-file", str(file))
    console.page.click("#upload")
    error = console.wait("(() => { const e = document.querySelector('#admin-error'); return !e.hidden && e.textContent; })()",
                         "the refusal")
    assert "HTTP 403" in error and "admin key" in error
    console.check_clean()


def test_a_bound_key_sees_and_runs_only_its_profile(console, served):
    console.use_key(BOUND_KEY)
    assert console.profile_options() == [["prose"]] * 2  # no "unsteered", no other profile
    assert console.page.evaluate("[...document.querySelectorAll('#profiles-table tbody tr')]"
                                 ".map(r => r.dataset.profile)") == ["prose"]
    # a direct API call with another profile, from the page's origin with the page's key: refused
    status, error = console.page.evaluate("""async () => {
        const key = sessionStorage.getItem('unipool-console-key');
        const resp = await fetch('/v1/completions', {method: 'POST',
            headers: {'Authorization': `Bearer ${key}`, 'Content-Type': 'application/json'},
            body: JSON.stringify({model: 'unipool-demo', prompt: 'x', max_tokens: 2, steering: 'code'})});
        return [resp.status, (await resp.json()).error];
    }""")
    assert status == 403 and error["code"] == "steering_override_forbidden"
    other = httpx.get(f"{served.url}/v1/steering/profiles/code", headers={"Authorization": f"Bearer {BOUND_KEY}"})
    assert other.status_code == 404
    # the manual field sends what is typed; the API refuses it and the column shows why
    console.set_prompt(max_tokens=4)
    console.set_column(0, "prose", manual="code")
    console.set_column(1, "prose")
    refused, ran = console.run()
    assert refused["state"] == "error" and "HTTP 403" in refused["error"] and "bound" in refused["error"]
    assert ran["state"] == "done" and ran["text"]
    assert any("no unsteered column" in note for note in ran["notes"])
    console.check_clean()


def test_bad_input_shows_the_error_envelope(console):
    console.use_key(USER_KEY)
    console.set_prompt(max_tokens=4)
    console.set_column(0, "", manual="no-such-profile")
    console.set_column(1, "prose", budget="99")
    unknown, budget = console.run()
    assert unknown["state"] == budget["state"] == "error"
    assert "HTTP 400" in unknown["error"] and "unknown steering profile 'no-such-profile'" in unknown["error"]
    assert "HTTP 400" in budget["error"] and "exceeds the model's top_k=1" in budget["error"]
    assert not unknown["maps"] and not budget["maps"]
    # a wrong key: the page's first calls are refused, in words
    console.use_key("not-a-key")
    message = console.wait("(() => { const e = document.querySelector('#global-error'); return !e.hidden && e.textContent; })()",
                           "the refusal")
    assert "HTTP 401" in message and "invalid API key" in message
    console.check_clean()
