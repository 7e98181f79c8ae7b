"""The steering console's routes and the API it needs, without an engine: the page and its assets
are open and carry a strict CSP, hold no inline script or style, are listed in ROUTE_ACCESS and
shipped as package data; --no-console unmounts them; a key bound to a profile sees that profile
only; `?rows=true` gives a profile's tables to those who may see its content."""

from __future__ import annotations

import asyncio
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from unipool_serve.model_executor.config import UniPoolConfig
from unipool_serve.model_executor.settings import ServerSettings
from unipool_serve.model_executor.steering.profile import SteeringProfile
from unipool_serve.model_executor.steering.shape import SteerableModel
from unipool_serve.server import cli, console
from unipool_serve.server.app_state import ServerState, attach_state
from unipool_serve.server.gateway import APIGateway
from unipool_serve.server.policy import ROUTE_ACCESS, Access, AccessPolicy
from unipool_serve.server.profile_store import ProfileStore
from unipool_serve.server.steering_api import router as steering_router

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "unipool-demo"
STATIC = ROOT / "server" / "console" / "static"
USER, BOUND, ADMIN = "user-key", "prose-key", "admin-key"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def _client(public_details: bool = False, with_console: bool = True) -> TestClient:
    """Our routes behind the gateway, keys configured, the demo model's shape, two profiles."""
    model = SteerableModel.of(UniPoolConfig.from_pretrained(str(DEMO)))
    store = ProfileStore(model, max_profiles=4)
    config = UniPoolConfig.from_pretrained(str(DEMO))
    bias = [[0.0] * model.num_experts for _ in range(model.num_layers)]
    bias[1][3] = 2.0
    for profile in (SteeringProfile.for_config(config, name="prose", bias=bias, alpha=1.5, exclude={0: [7]},
                                               description="prose please"),
                    SteeringProfile.for_config(config, name="code", include={2: [4]})):
        asyncio.run(store.add(profile, persist=False))
    policy = AccessPolicy.parse([USER, f"{BOUND}=prose"], ADMIN)
    app = FastAPI()
    app.include_router(steering_router)
    if with_console:
        app.include_router(console.router)
    attach_state(app, ServerState(policy, ServerSettings(public_profile_details=public_details), lambda: None,
                                  store=store))
    app.add_middleware(APIGateway, router=app.router, policy=policy)
    return TestClient(app)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---- the page and its assets ---------------------------------------------------------------


@pytest.mark.parametrize("path,media_type", [
    ("/console", "text/html"),
    ("/console/static/console.js", "text/javascript"),
    ("/console/static/console.css", "text/css"),
    ("/console/static/icon.svg", "image/svg+xml"),
])
def test_the_page_and_its_assets_are_open_and_carry_a_strict_csp(path, media_type):
    resp = _client().get(path)  # keys are configured, none is sent: the page holds no data
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith(media_type)
    assert resp.headers["content-security-policy"] == CSP
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["referrer-policy"] == "no-referrer"


def test_only_the_shipped_assets_are_served():
    client = _client()
    for name in ("missing.js", "__init__.py", "..%2F__init__.py", "console.html"):
        resp = client.get(f"/console/static/{name}")
        assert resp.status_code == 404 and resp.json()["error"]["message"], name
    assert set(console.ASSETS) | {console.PAGE} == {p.name for p in STATIC.iterdir()}


def test_the_console_routes_are_open_in_route_access():
    paths = {route.path for route in console.router.routes}
    assert paths == {"/console", "/console/static/{asset}"}
    assert all(ROUTE_ACCESS.get(path) is Access.OPEN for path in paths)


class _Markup(HTMLParser):
    """What the page's CSP would block: inline scripts, inline styles, event-handler attributes."""

    def __init__(self):
        super().__init__()
        self.inline: list[str] = []
        self.scripts: list[str] = []
        self.in_script = False

    def handle_starttag(self, tag, attrs):
        names = {name for name, _ in attrs}
        self.inline += [f"<{tag} {name}>" for name in names if name == "style" or name.startswith("on")]
        if tag == "style":
            self.inline.append("<style>")
        if tag == "script":
            src = dict(attrs).get("src")
            self.scripts.append(src or "")
            self.in_script = not src

    def handle_data(self, data):
        if self.in_script and data.strip():
            self.inline.append("<script> with content")

    def handle_endtag(self, tag):
        if tag == "script":
            self.in_script = False


def test_the_page_has_no_inline_script_or_style():
    markup = _Markup()
    markup.feed((STATIC / console.PAGE).read_text())
    assert markup.inline == []
    assert markup.scripts == ["/console/static/console.js"]
    script = (STATIC / "console.js").read_text()
    for forbidden in ("eval(", "new Function", "innerHTML", "setAttribute('style'", "localStorage"):
        assert forbidden not in script, forbidden


def test_the_assets_ship_as_package_data():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "unipool_serve.server.console" in project["packages"]
    assert project["package-data"]["unipool_serve.server.console"] == ["static/*"]


# ---- --no-console -------------------------------------------------------------------------


def test_no_console_leaves_the_routes_unmounted(monkeypatch, tmp_path):
    from unipool_serve.server.endpoint_plugin import UniPoolEndpointPlugin

    ours = cli.our_parser().parse_known_args(["--no-console"])[0]
    (tmp_path / "config.json").write_text("{}")
    settings = cli.server_settings(ours, tmp_path)
    assert settings.console is False
    assert cli.server_settings(cli.our_parser().parse_known_args([])[0], tmp_path).console is True
    for env, mounted in (("0", False), ("1", True)):
        monkeypatch.setenv("UNIPOOL_CONSOLE", env)
        app = FastAPI()
        UniPoolEndpointPlugin().attach_router(app)
        assert ("/console" in {getattr(r, "path", None) for r in app.router.routes}) is mounted
    settings.export()
    assert ServerSettings.from_env().console is False


# ---- what each key sees of the profiles ----------------------------------------------------


def test_a_bound_key_lists_and_reads_only_its_profile():
    client = _client()
    listing = client.get("/v1/steering/profiles", headers=_auth(BOUND)).json()
    assert [p["id"] for p in listing["data"]] == ["prose"] and listing["bound_profile"] == "prose"
    assert listing["model"] == {"num_layers": 4, "num_experts": 16, "top_k": 1}
    assert client.get("/v1/steering/profiles/prose", headers=_auth(BOUND)).status_code == 200
    other = client.get("/v1/steering/profiles/code", headers=_auth(BOUND))
    unknown = client.get("/v1/steering/profiles/nothing", headers=_auth(BOUND))
    assert other.status_code == unknown.status_code == 404
    assert other.json()["error"]["code"] == unknown.json()["error"]["code"] == "unknown_steering_profile"
    assert other.json()["error"]["message"] == unknown.json()["error"]["message"].replace("'nothing'", "'code'")
    assert "code" not in other.json()["error"]["message"].replace("'code'", "")  # no other name leaks
    # an unbound user and the admin see every profile
    for key in (USER, ADMIN):
        listing = client.get("/v1/steering/profiles", headers=_auth(key)).json()
        assert [p["id"] for p in listing["data"]] == ["code", "prose"] and listing["bound_profile"] is None
        assert client.get("/v1/steering/profiles/code", headers=_auth(key)).status_code == 200


def test_profile_rows_follow_the_details_rule():
    client = _client()
    rows = client.get("/v1/steering/profiles/prose?rows=true", headers=_auth(ADMIN)).json()["rows"]
    assert len(rows["bias"]) == 4 and len(rows["bias"][0]) == 16
    assert rows["bias"][1][3] == 3.0 and sum(map(abs, sum(rows["bias"], []))) == 3.0  # alpha 1.5 folded in
    assert rows["mask"][0][7] == -1 and sum(map(abs, sum(rows["mask"], []))) == 1
    code = client.get("/v1/steering/profiles/code?rows=true", headers=_auth(ADMIN)).json()["rows"]
    assert code["mask"][2][4] == 1
    assert "rows" not in client.get("/v1/steering/profiles/prose", headers=_auth(ADMIN)).json()
    for key in (USER, BOUND):
        refused = client.get("/v1/steering/profiles/prose?rows=true", headers=_auth(key))
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "profile_details_hidden"
    public = _client(public_details=True)
    assert public.get("/v1/steering/profiles/prose?rows=true", headers=_auth(BOUND)).json()["rows"] == rows
    assert public.get("/v1/steering/profiles/code?rows=true", headers=_auth(BOUND)).status_code == 404
    assert _client().get("/v1/steering/profiles").status_code == 401  # the API still needs a key
