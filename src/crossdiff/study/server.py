"""`crossdiff study serve`: the scoring pages, served on the loopback interface only (Starlette + uvicorn).

Every page lives under /s/TOKEN/, TOKEN being the study's secret (compared in constant time); anything
else is refused. A reader gives a name once (kept in a cookie scoped to the study) and is shown the
items in their own order, one page each, resuming at the first one they have not scored. Request paths
never reach the file system: an image is looked up by item id and window name among the study's own,
and only those files are served; the key and the scores database have no route. Pages never show a
score, not even the reader's own, so nobody learns another reader's answers by typing their name.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
import unicodedata
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crossdiff.errors import CrossdiffError
from crossdiff.study.layout import IMAGES, SCALE, SCORES_FILE, Study, load_study, read_token
from crossdiff.study.store import ScoreStore

HERE = Path(__file__).parent
STATIC = {"scoring.js": "text/javascript", "study.css": "text/css"}  # the only static files there are
COOKIE = "crossdiff_reader"
MAX_FORM_BYTES = 64 * 1024
MAX_NAME = 80
MAX_COMMENT = 4000
DEFAULT_PORT = 8765
HEADERS = {
    "content-security-policy": "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
Endpoint = Callable[[Request], Awaitable[Response]]


def loopback_host(host: str) -> str:
    """The address to bind: an IPv4 loopback address ('localhost' is 127.0.0.1); anything else is refused,
    since the token in the URL is the study's only lock and must not be offered to a network."""
    candidate = "127.0.0.1" if host == "localhost" else host
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        address = None
    if address is None or address.version != 4 or not address.is_loopback:
        raise CrossdiffError(f"refusing to listen on {host!r}: the study server binds to the loopback interface only "
                             "(127.0.0.1); readers on other machines reach it through an SSH tunnel "
                             f"(ssh -L {DEFAULT_PORT}:127.0.0.1:{DEFAULT_PORT} THIS_HOST)")
    return candidate


class _SecurityHeaders:
    """Adds HEADERS to every response: no caching, no framing, no referrer (the token is in the URL)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *((k.encode(), v.encode()) for k, v in HEADERS.items())]
            await send(message)

        await self.app(scope, receive, with_headers)


class StudyPages:
    """The endpoints of one study; `app()` assembles them."""

    def __init__(self, folder: Path) -> None:
        self.study: Study = load_study(folder)
        self.token = read_token(folder)
        self.store = ScoreStore(Path(folder) / SCORES_FILE)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.base = f"/s/{self.token}"

    def app(self, host: str = "127.0.0.1") -> Starlette:
        pages = [
            ("/", self.start, ["GET"]),
            ("/reader", self.reader, ["GET", "POST"]),
            ("/item/{position:int}", self.item, ["GET", "POST"]),
            ("/done", self.done, ["GET"]),
            ("/image/{item}/{window}.png", self.image, ["GET"]),
            ("/static/{name}", self.static, ["GET"]),
        ]
        guarded = [Route(path, self._guard(endpoint), methods=methods) for path, endpoint, methods in pages]
        routes = [Route("/", self.refuse), Route("/favicon.ico", _no_content), Mount("/s/{token}", routes=guarded)]
        middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=sorted({"127.0.0.1", "localhost", host})),
                      Middleware(_SecurityHeaders)]
        return Starlette(routes=routes, middleware=middleware,
                         exception_handlers={404: self._not_found, 405: self._not_found})

    # ------------------------------------------------------------------------------------ guarding

    def _guard(self, endpoint: Endpoint) -> Endpoint:
        async def guarded(request: Request) -> Response:
            if not hmac.compare_digest(request.path_params["token"].encode(), self.token.encode()):
                return await self.refuse(request)
            return await endpoint(request)

        return guarded

    async def refuse(self, request: Request) -> Response:
        return self._message(request, "Access token missing or wrong",
                             "Open the address that `crossdiff study serve` printed, with its access token.", 403)

    async def _not_found(self, request: Request, _: Exception | None = None) -> Response:
        return self._message(request, "Not found", "There is no such page in this study.", 404)

    def _message(self, request: Request, title: str, text: str, status: int) -> Response:
        return self.templates.TemplateResponse(request, "message.html", {"title": title, "text": text, "base": None},
                                               status_code=status)

    # ------------------------------------------------------------------------------------- readers

    def _reader(self, request: Request) -> str | None:
        name = clean_name(unquote(request.cookies.get(COOKIE, "")))
        return name or None

    async def start(self, request: Request) -> Response:
        reader = self._reader(request)
        if reader is None:
            return self._reader_form(request)
        return RedirectResponse(self._next_url(reader, 0), status_code=303)

    async def reader(self, request: Request) -> Response:
        if request.method == "GET":
            return self._reader_form(request)
        form = await read_form(request)
        name = clean_name(form.get("name", ""))
        if not name:
            return self._reader_form(request, "Please type your name (up to 80 characters).", 400)
        self.store.add_reader(name)
        response = RedirectResponse(f"{self.base}/", status_code=303)
        response.set_cookie(COOKIE, quote(name), max_age=365 * 24 * 3600, path=f"{self.base}/",
                            httponly=True, samesite="strict")
        return response

    def _reader_form(self, request: Request, error: str = "", status: int = 200) -> Response:
        context = {"title": self.study.title, "base": self.base, "error": error,
                   "count": len(self.study.items), "reader": self._reader(request)}
        return self.templates.TemplateResponse(request, "reader.html", context, status_code=status)

    # --------------------------------------------------------------------------------------- items

    def _next_url(self, reader: str, after: int) -> str:
        """The first item the reader has not scored after position `after` (wrapping round), else the end page."""
        order = self.study.order_for(reader)
        done = self.store.answered(reader, len(self.study.questions))
        positions = [*range(after, len(order)), *range(after)]
        following = next((p for p in positions if order[p] not in done), None)
        return f"{self.base}/done" if following is None else f"{self.base}/item/{following + 1}"

    async def item(self, request: Request) -> Response:
        reader = self._reader(request)
        if reader is None:
            return RedirectResponse(f"{self.base}/", status_code=303)
        position = request.path_params["position"]
        order = self.study.order_for(reader)
        if not 1 <= position <= len(order):
            return await self._not_found(request)
        item = order[position - 1]
        if request.method == "GET":
            return self._item_page(request, reader, position, item)
        form = await read_form(request)
        scores, problem = parse_scores(form, [q.id for q in self.study.questions])
        comment = form.get("comment", "").strip()
        if len(comment) > MAX_COMMENT:
            problem = f"The comment is longer than {MAX_COMMENT} characters."
        if problem:
            return self._item_page(request, reader, position, item, problem, 400)
        self.store.save(reader, item, scores, comment)  # committed before the reader moves on
        return RedirectResponse(self._next_url(reader, position), status_code=303)

    def _item_page(self, request: Request, reader: str, position: int, item: str, error: str = "",
                   status: int = 200) -> Response:
        base = self.base
        done = self.store.answered(reader, len(self.study.questions))
        total = len(self.study.items)
        context: dict[str, Any] = {
            "title": self.study.title, "base": base, "reader": reader, "position": position, "total": total,
            "scored": len(done), "already": item in done, "error": error, "questions": self.study.questions,
            "scale": range(SCALE[0], SCALE[1] + 1),
            "images": [(w, f"{base}/image/{item}/{w.name}.png") for w in self.study.windows],
            "previous": f"{base}/item/{position - 1}" if position > 1 else None,
            "next": f"{base}/item/{position + 1}" if position < total else None,
        }
        return self.templates.TemplateResponse(request, "item.html", context, status_code=status)

    async def done(self, request: Request) -> Response:
        reader = self._reader(request)
        if reader is None:
            return RedirectResponse(f"{self.base}/", status_code=303)
        scored = len(self.store.answered(reader, len(self.study.questions)))
        context = {"title": self.study.title, "base": self.base, "reader": reader, "scored": scored,
                   "total": len(self.study.items)}
        return self.templates.TemplateResponse(request, "done.html", context)

    # -------------------------------------------------------------------------------------- files

    async def image(self, request: Request) -> Response:
        """An item's PNG, found by id and window among the study's own (never a path built from the request)."""
        path = self.study.image(request.path_params["item"], request.path_params["window"])
        images = (self.study.folder / IMAGES).resolve()
        if path is None or not path.resolve().is_relative_to(images) or not path.is_file():
            return await self._not_found(request)
        return FileResponse(path.resolve(), media_type="image/png")

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return await self._not_found(request)
        return FileResponse(HERE / "static" / name, media_type=STATIC[name])


async def _no_content(request: Request) -> Response:
    return Response(status_code=204)  # browsers ask for an icon at the root, where nothing else is served


async def read_form(request: Request) -> dict[str, str]:
    """An url-encoded form body (at most MAX_FORM_BYTES), as {field: first value}."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True, max_num_fields=100)
    return {key: values[0] for key, values in fields.items()}


def parse_scores(form: dict[str, str], questions: list[str]) -> tuple[dict[str, int], str]:
    """{question: score} from fields q-QUESTION, and a problem to show when one is missing or off the scale."""
    allowed = {str(v): v for v in range(SCALE[0], SCALE[1] + 1)}
    scores = {q: allowed[form[f"q-{q}"]] for q in questions if form.get(f"q-{q}") in allowed}
    missing = len(questions) - len(scores)
    problem = "" if not missing else f"Please answer every question ({missing} left) on the scale 1-5."
    return scores, problem


def clean_name(text: str) -> str:
    """A reader's name without control characters or surrounding space, '' when none is left or it is too long."""
    name = "".join(c for c in text if unicodedata.category(c)[0] != "C").strip()
    return name if len(name) <= MAX_NAME else ""


def serve(folder: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          announce: Callable[[str, StudyPages], None] | None = None) -> None:
    """Serve the study until interrupted; `announce(url, pages)` is called once the socket is bound."""
    import uvicorn

    address = loopback_host(host)
    pages = StudyPages(folder)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart after a kill gets its port back
    try:
        listener.bind((address, port))
    except OSError as error:
        listener.close()
        raise CrossdiffError(f"cannot listen on {address}:{port} ({error.strerror}); choose another --port") from None
    listener.listen()
    url = f"http://{address}:{listener.getsockname()[1]}/s/{pages.token}/"
    if announce is not None:
        announce(url, pages)
    config = uvicorn.Config(pages.app(address), log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[listener])
