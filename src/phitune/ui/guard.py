"""Who may talk to the page: an ASGI middleware in front of Gradio that refuses, with 403, any request whose Host or
Origin is not the page's own address, and any request without the secret of this start (Jupyter's token).

Why: a web site the user visits can make its name resolve to 127.0.0.1 (DNS rebinding) and is then same-origin with
the page; the Host check stops that, because its requests say `Host: evil.example:PORT`. The token stops every other
caller that has not read the terminal (another site's forms, a local program that guesses the port): the printed
address carries it (`/?token=...`), and the first request with it sets a cookie for the page's own requests. Plain
ASGI and the standard library, no gradio, so it runs in front of Gradio's own app and middleware.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
WILDCARD = ("0.0.0.0", "::", "")  # --host that listens on every address of the machine


def new_token() -> str:
    """A fresh secret for one start of the page (192 random bits, URL-safe)."""
    return secrets.token_urlsafe(24)


def url_host(host: str) -> str:
    """`host` as it appears in a URL: IPv6 addresses in brackets, a wildcard bind as 127.0.0.1."""
    if host in WILDCARD:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class PageGuard:
    """ASGI middleware: a request reaches `app` only if its Host is one of the page's addresses (loopback, the --host
    given; with a wildcard --host, also an IP address or this machine's name), its Origin (when sent) is `http://` one
    of them, and it carries `token` in the query string or the cookie (`token=None`: --no-token)."""

    def __init__(self, app, host: str, port: int, token: str | None):
        self.app, self.port, self.token = app, port, token
        self.names = {*LOOPBACK, url_host(host)} | ({socket.gethostname().lower()} if host in WILDCARD else set())
        self.any_address = host in WILDCARD
        self.cookie = f"phitune-ui-{port}"

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):  # lifespan: Gradio's start-up, not a request
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        refusal, fresh = self.refusal(headers), False
        if refusal is None:
            refusal, fresh = self.token_refusal(headers, scope.get("query_string", b"").decode("latin-1"))
        if refusal is not None:
            await _refuse(scope, send, refusal)
        elif fresh:
            await self.app(scope, receive, self._with_cookie(send))
        else:
            await self.app(scope, receive, send)

    def refusal(self, headers: dict) -> str | None:
        """Why a request with these headers is not for this page (None: its Host and Origin are the page's)."""
        if not self.is_page_address(headers.get("host", "")):
            return "this page answers only at its own address (" + ", ".join(
                f"{name}:{self.port}" for name in sorted(self.names)) + ")"
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            if parts.scheme != "http" or parts.path not in ("", "/") or not self.is_page_address(parts.netloc):
                return "requests from other web sites are refused"
        return None

    def is_page_address(self, netloc: str) -> bool:
        """`netloc` (name:port, as in Host) is one of the page's addresses, on the page's port."""
        name, _, port = netloc.lower().rpartition(":")
        if not port.isdigit():  # no port: a browser leaves out the default one, 80
            name, port = netloc.lower(), "80"
        if port != str(self.port):
            return False
        if name in self.names:
            return True
        try:
            ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            return False
        return self.any_address  # an address cannot be rebound: a name is what a rebinding site has to send

    def token_refusal(self, headers: dict, query: str) -> tuple[str | None, bool]:
        """(why the request is refused or None, whether it brought the token in its query string: set the cookie)."""
        if self.token is None:
            return None, False
        if any(hmac.compare_digest(value, self.token) for value in parse_qs(query).get("token", [])):
            return None, True
        morsel = SimpleCookie(headers.get("cookie", "")).get(self.cookie)
        if morsel is not None and hmac.compare_digest(morsel.value, self.token):
            return None, False
        return "open the address phitune ui printed in its terminal (it carries this start's token)", False

    def _with_cookie(self, send):
        """`send` that adds the token's cookie to the response: the page's own later requests carry it."""
        cookie = f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode("latin-1")

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (b"set-cookie", cookie)])
            await send(message)

        return send_with_cookie


async def _refuse(scope, send, reason: str) -> None:
    """403 with one line saying why (a websocket is closed before it opens, which the server answers with 403)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = f"403 forbidden: {reason}\n".encode()
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
