"""`/docs` and `/redoc` work with no network: every asset comes from the server itself.

A live server's doc pages are parsed for everything a browser loads with them (`src`,
`href`, ReDoc's `spec-url`, the paths Swagger UI's inline script loads), each is fetched
from the server and must be 200 with a body; stylesheets are followed for their `url(...)`
and `@import`s. No page or stylesheet may name an http(s) URL elsewhere, and Swagger UI's
validator badge (an image from validator.swagger.io) must be off.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import fastapi_offline
import httpx
import pytest

from dynprompt.models import Backbone
from tests.server_util import TEST_MODELS, ServerProcess, build_repository, start_server

pytestmark = pytest.mark.timeout(300)

PAGES = ("/docs", "/redoc")
ABSOLUTE_URL = re.compile(r"https?://[^\s\"'<>()]+")
# Paths an inline script loads: Swagger UI's `url: '/openapi.json'` and its OAuth2 redirect page.
SCRIPT_PATH = re.compile(r"""['"](/[A-Za-z0-9._/-]+)['"]""")
CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]+)['"]?\s*\)|@import\s+['"]([^'"]+)['"]""")
PACKAGE_STATIC = Path(fastapi_offline.__file__).parent / "static"


class References(HTMLParser):
    """What a browser fetches with a page: src/href/spec-url attributes, inline script paths."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_script = tag == "script"
        self.found += [
            value for name, value in attrs if name in ("src", "href", "spec-url") and value
        ]

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.found += SCRIPT_PATH.findall(data)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, minilm: Backbone) -> Any:
    path = tmp_path_factory.mktemp("docs-repo")
    build_repository(path, minilm, {"probe": TEST_MODELS["probe"]})
    proc = start_server(
        ["--model-repository", str(path)], log_dir=tmp_path_factory.mktemp("docs-logs")
    )
    yield proc
    assert proc.stop() == 0, proc.logs()[-3000:]


def outside(url: str, server: ServerProcess) -> bool:
    return not url.startswith(server.url + "/") and url != server.url


def fetch_local(client: httpx.Client, base: str, ref: str, server: ServerProcess) -> httpx.Response:
    url = urljoin(base, ref)
    assert not outside(url, server), f"{base} references {ref}, outside the server"
    response = client.get(url)
    assert response.status_code == 200, (url, response.status_code)
    assert response.content, f"{url} is empty"
    return response


@pytest.mark.parametrize("page", PAGES)
def test_page_and_every_asset_it_loads_come_from_the_server(
    server: ServerProcess, page: str
) -> None:
    with httpx.Client(timeout=60) as client:
        base = server.url + page
        html = fetch_local(client, base, page, server)
        assert html.headers["content-type"].startswith("text/html")
        external = [url for url in ABSOLUTE_URL.findall(html.text) if outside(url, server)]
        assert external == [], external
        parser = References()
        parser.feed(html.text)
        refs = sorted(set(parser.found))
        paths = {urlsplit(urljoin(base, ref)).path for ref in refs}
        assert "/openapi.json" in paths, refs
        assert any(p.endswith(".js") for p in paths), refs
        assert any(p.endswith((".png", ".ico", ".svg")) for p in paths), refs  # the favicon
        if page == "/docs":
            assert any(p.endswith(".css") for p in paths), refs
            assert "/docs/oauth2-redirect" in paths, refs
            assert '"validatorUrl": null' in html.text
        seen = 0
        for ref in refs:
            response = fetch_local(client, base, ref, server)
            seen += 1
            path = urlsplit(str(response.url)).path
            asset = PACKAGE_STATIC / Path(path).name
            if path.startswith("/static-offline-docs/"):
                assert response.content == asset.read_bytes(), f"{path} is not the package's file"
            if path.endswith(".css"):
                for match in CSS_URL.finditer(response.text):
                    target = (match.group(1) or match.group(2)).strip()
                    if not target.startswith("data:"):
                        fetch_local(client, str(response.url), target, server)
                        seen += 1
            if path.endswith(".js"):
                assert "javascript" in response.headers["content-type"], response.headers
        assert seen >= 3
