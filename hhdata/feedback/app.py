"""The annotation web app: chat with a policy, compare two replies per turn, pick one.

Starlette + uvicorn, pages rendered on the server by Jinja2 with autoescaping (every
message and every model reply is text, never markup), one small script for progress.
All state lives in the SQLite store (hhdata.feedback.db), sessions included, so a restarted
server goes on where it stopped. Handlers are plain functions: Starlette runs them in its
thread pool, each thread with its own SQLite connection; generation runs there too, one
call at a time per model (a lock: a torch module is not made for concurrent forward calls).

Security: every page but the sign-in page needs a session (cookie, HttpOnly, SameSite
Strict) opened with a token; a conversation is found only with its owner's id; the admin
page needs an admin token; every POST carries the session's CSRF token (the sign-in form a
double-submit cookie); messages have a size limit and posts a rate limit per annotator.
Tokens travel only in POST bodies, so no access log line holds one.
"""

from __future__ import annotations

import json
import random
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from hhdata.feedback import db
from hhdata.feedback.auth import RateLimit, same_secret
from hhdata.feedback.export import export
from hhdata.feedback.policy import Policy, load_policy
from hhdata.pairs.transcript import SEPARATORS

HERE = Path(__file__).parent
SESSION_COOKIE, LOGIN_COOKIE = "hh_session", "hh_login"
MAX_MESSAGE_CHARS = 2000
STRENGTH_WORDS = {1: "slightly", 2: "clearly", 3: "much"}


@dataclass
class Settings:
    """What the app was started with; the sampling part is stored with each conversation."""

    db_path: str
    policies: tuple[Policy, Policy]
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 0.9
    rate_limit: int = 60  # state-changing posts per annotator per minute
    export_dir: str = ""  # where the admin page's export button writes (default_export_dir)

    def sampling(self) -> dict:
        return {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "models": [policy.model_id for policy in self.policies],
        }


class Denied(Exception):
    """A request refused with an HTTP status and a one-line reason shown to the user."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def create_app(settings: Settings) -> Starlette:
    """The app over one store and one or two loaded policies."""
    # autoescape everywhere: messages and model replies are text, never markup
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    templates = Jinja2Templates(env=env)
    local = threading.local()
    limit = RateLimit(settings.rate_limit, per_seconds=60)
    cancels: dict[int, threading.Event] = {}  # conversation id -> its running generation
    exporting = threading.Lock()

    def store():
        if not hasattr(local, "db"):
            local.db = db.connect(settings.db_path)
        return local.db

    def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=status)

    def signed_in(request: Request) -> tuple[db.Annotator, str]:
        session = request.cookies.get(SESSION_COOKIE)
        found = db.session_of(store(), session) if session else None
        if found is None:
            raise Denied(401, "sign in with your token first")
        return found

    def checked(request: Request, form: dict) -> tuple[db.Annotator, str]:
        """The signed-in annotator of a POST whose CSRF token and rate are in order."""
        annotator, csrf = signed_in(request)
        if not same_secret(form.get("csrf", ""), csrf):
            raise Denied(403, "the form's CSRF token is missing or wrong; reload the page")
        if not limit.allow(annotator.id):
            raise Denied(429, "too many requests; wait a minute and try again")
        return annotator, csrf

    def own_conversation(annotator: db.Annotator, request: Request):
        row = db.conversation(store(), annotator, int(request.path_params["cid"]))
        if row is None:  # someone else's is as absent as a missing one
            raise Denied(404, "no such conversation")
        return row

    def login_form(request: Request, status: int = 200, error: str = "") -> Response:
        nonce = secrets.token_urlsafe(16)
        response = page(request, "login.html", status, nonce=nonce, error=error)
        response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict")
        return response

    def login_page(request: Request) -> Response:
        return login_form(request)

    def login(request: Request, form: dict) -> Response:
        if not same_secret(form.get("nonce", ""), request.cookies.get(LOGIN_COOKIE, "")):
            raise Denied(403, "the sign-in form expired; reload the page")
        annotator = db.annotator_by_token(store(), str(form.get("token", "")).strip())
        if annotator is None:
            return login_form(request, 401, "unknown token")
        session, _ = db.open_session(store(), annotator)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict")
        response.delete_cookie(LOGIN_COOKIE)
        return response

    def logout(request: Request, form: dict) -> Response:
        checked(request, form)
        db.close_session(store(), request.cookies[SESSION_COOKIE])
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    def home(request: Request) -> Response:
        annotator, csrf = signed_in(request)
        conversations = db.conversations_of(store(), annotator)
        return page(request, "home.html", annotator=annotator, csrf=csrf, rows=conversations)

    def new_conversation(request: Request, form: dict) -> Response:
        annotator, _ = checked(request, form)
        task = form.get("task", "")
        if task not in db.TASKS:
            raise Denied(400, f"task must be one of {list(db.TASKS)}")
        cid = db.start_conversation(store(), annotator, task, settings.sampling())
        return RedirectResponse(f"/c/{cid}", status_code=303)

    def show_conversation(request: Request) -> Response:
        annotator, csrf = signed_in(request)
        conv = own_conversation(annotator, request)
        turns = db.turns_of(store(), conv["id"])
        pending = turns[-1] if turns and turns[-1]["choice"] is None else None
        return page(
            request,
            "conversation.html",
            annotator=annotator,
            csrf=csrf,
            conv=conv,
            so_far=db.history(turns),
            pending=pending,
            red_team=conv["task"] == db.RED_TEAM,
            strengths=STRENGTH_WORDS,
            max_chars=MAX_MESSAGE_CHARS,
        )

    def send_message(request: Request, form: dict) -> Response:
        annotator, _ = checked(request, form)
        conv = own_conversation(annotator, request)
        message = clean_message(str(form.get("message", "")))
        turns = db.turns_of(store(), conv["id"])
        if conv["ended_at"] is not None:
            raise Denied(409, "this conversation has ended; start a new one")
        if turns and turns[-1]["choice"] is None:
            raise Denied(409, "answer the open comparison before writing again")
        so_far = db.history(turns) + [{"role": "user", "content": message}]
        stop = cancels.setdefault(conv["id"], threading.Event())
        try:
            replies, models = sample_pair(settings, so_far, stop)
        finally:
            cancels.pop(conv["id"], None)
        if stop.is_set():  # cancelled: nothing is stored, the message box comes back
            return RedirectResponse(f"/c/{conv['id']}", status_code=303)
        try:
            db.add_turn(store(), conv["id"], len(turns), message, replies, models)
        except db.FeedbackError:
            raise Denied(409, "this message was sent twice; the first one counts") from None
        return RedirectResponse(f"/c/{conv['id']}", status_code=303)

    def cancel(request: Request, form: dict) -> Response:
        annotator, _ = checked(request, form)
        conv = own_conversation(annotator, request)
        running = cancels.get(conv["id"])
        if running is None:
            raise Denied(409, "no reply is being generated")
        running.set()
        return Response(status_code=204)

    def choose(request: Request, form: dict) -> Response:
        annotator, _ = checked(request, form)
        conv = own_conversation(annotator, request)
        choice, _, strength = str(form.get("pick", "")).partition(":")
        try:
            idx = int(form.get("turn", ""))
            done = db.answer_turn(
                store(), conv["id"], idx, choice, int(strength) if strength else None
            )
        except (ValueError, db.FeedbackError):
            raise Denied(400, "pick A or B with a strength, or skip") from None
        if not done:
            raise Denied(409, "this comparison was answered already")
        return RedirectResponse(f"/c/{conv['id']}", status_code=303)

    def end(request: Request, form: dict) -> Response:
        annotator, _ = checked(request, form)
        conv = own_conversation(annotator, request)
        db.end_conversation(store(), conv["id"])
        return RedirectResponse("/", status_code=303)

    def admin_page(request: Request, annotator, csrf, exported=None) -> Response:
        if not annotator.is_admin:
            raise Denied(403, "the admin page needs an admin token")
        return page(
            request,
            "admin.html",
            annotator=annotator,
            csrf=csrf,
            rows=db.counts(store()),
            agreement=db.agreement(store()),
            export_dir=settings.export_dir,
            exported=exported,
        )

    def admin(request: Request) -> Response:
        return admin_page(request, *signed_in(request))

    def export_now(request: Request, form: dict) -> Response:
        """The admin's export button: `hhdata feedback export` into the serve-time folder."""
        annotator, csrf = checked(request, form)
        if not annotator.is_admin:
            raise Denied(403, "exporting needs an admin token")
        with exporting:  # two clicks at once: one export after the other, never interleaved
            written = export(store(), settings.export_dir)
        return admin_page(request, annotator, csrf, exported=written)

    def show_queue(request: Request) -> Response:
        annotator, csrf = signed_in(request)
        item = db.next_queue_item(store(), annotator)
        return page(
            request,
            "queue.html",
            annotator=annotator,
            csrf=csrf,
            item=item,
            prompt=json.loads(item["prompt"]) if item else [],
            red_team=item is not None and item["task"] == db.RED_TEAM,
            strengths=STRENGTH_WORDS,
        )

    def label_queue(request: Request, form: dict) -> Response:
        annotator, _ = checked(request, form)
        choice, _, strength = str(form.get("pick", "")).partition(":")
        try:
            done = db.label_queue_item(
                store(),
                annotator,
                int(request.path_params["qid"]),
                choice,
                int(strength) if strength else None,
            )
        except (ValueError, db.FeedbackError, sqlite3.IntegrityError):
            raise Denied(400, "pick A or B with a strength, or skip, of an existing item") from None
        if not done:
            raise Denied(409, "you labelled this pair already")
        return RedirectResponse("/queue", status_code=303)

    def api_caller(request: Request) -> db.Annotator:
        """The admin behind an API call's `Authorization: Bearer TOKEN` (no cookie, so no
        CSRF: a browser never adds this header on its own)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        caller = db.annotator_by_token(store(), token.strip()) if scheme == "Bearer" else None
        if caller is None:
            raise Denied(401, "send the admin token as 'Authorization: Bearer TOKEN'")
        if not caller.is_admin:
            raise Denied(403, "the queue API needs an admin token")
        return caller

    async def post_queue(request: Request) -> Response:
        api_caller(request)
        try:
            body = json.loads(await request.body())
            task, items = body["task"], body["items"]
            checked_items = [queue_item(item) for item in items]
        except (ValueError, KeyError, TypeError) as error:
            raise Denied(400, f"the body must be {QUEUE_BODY} ({error})") from None
        if len(checked_items) > MAX_QUEUE_ITEMS:
            raise Denied(413, f"at most {MAX_QUEUE_ITEMS} items per post")
        swaps = [random.random() < 0.5 for _ in checked_items]

        def store_items():
            try:
                return db.enqueue(store(), task, checked_items, swaps)
            except db.FeedbackError as error:
                raise Denied(400, str(error)) from None

        return JSONResponse({"ids": await run_in_threadpool(store_items)})

    def queue_results(request: Request) -> Response:
        api_caller(request)
        return JSONResponse({"results": db.queue_results(store())})

    def refused(request: Request, denied: Denied) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": denied.reason}, status_code=denied.status)
        if denied.status == 401 and request.method == "GET":
            return RedirectResponse("/login", status_code=303)
        return page(request, "error.html", denied.status, reason=denied.reason)

    return Starlette(
        routes=[
            Route("/login", login_page, methods=["GET"]),
            Route("/login", posted(login), methods=["POST"]),
            Route("/logout", posted(logout), methods=["POST"]),
            Route("/", home, methods=["GET"]),
            Route("/c", posted(new_conversation), methods=["POST"]),
            Route("/c/{cid:int}", show_conversation, methods=["GET"]),
            Route("/c/{cid:int}/message", posted(send_message), methods=["POST"]),
            Route("/c/{cid:int}/choose", posted(choose), methods=["POST"]),
            Route("/c/{cid:int}/cancel", posted(cancel), methods=["POST"]),
            Route("/c/{cid:int}/end", posted(end), methods=["POST"]),
            Route("/admin", admin, methods=["GET"]),
            Route("/admin/export", posted(export_now), methods=["POST"]),
            Route("/queue", show_queue, methods=["GET"]),
            Route("/queue/{qid:int}/choose", posted(label_queue), methods=["POST"]),
            Route("/api/queue", post_queue, methods=["POST"]),
            Route("/api/queue/results", queue_results, methods=["GET"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        exception_handlers={Denied: refused},
    )


QUEUE_BODY = (
    '{"task": "helpful" | "red-team", "items": [{"key": str, "prompt": [{"role", "content"}], '
    '"replies": [str, str], "models": [str, str]}]}'
)
MAX_QUEUE_ITEMS = 1000


def queue_item(item: dict) -> dict:
    """A posted queue item, checked: its transcript must render byte for byte."""
    prompt = [{"role": str(t["role"]), "content": str(t["content"])} for t in item["prompt"]]
    if (
        not prompt
        or prompt[-1]["role"] != "user"
        or any(t["role"] not in ("user", "assistant") for t in prompt)
    ):
        raise ValueError("prompt must be user/assistant turns ending with a user turn")
    replies, models = [str(r) for r in item["replies"]], [str(m) for m in item["models"]]
    if len(replies) != 2 or len(models) != 2:
        raise ValueError("replies and models hold two entries each")
    texts = [turn["content"] for turn in prompt] + replies
    if any(separator.rstrip() in text for text in texts for separator in SEPARATORS.values()):
        raise ValueError("a turn holds a blank line followed by 'Human:' or 'Assistant:'")
    if any(len(text) > 20 * MAX_MESSAGE_CHARS for text in texts):
        raise ValueError(f"a turn is longer than {20 * MAX_MESSAGE_CHARS} characters")
    return {"key": str(item["key"]), "prompt": prompt, "replies": replies, "models": models}


def posted(handler):
    """An endpoint that reads the form on the event loop, then runs `handler(request, form)`
    in the thread pool: its SQLite writes and generation must not hold up other requests."""

    async def endpoint(request: Request) -> Response:
        form = {key: value for key, value in (await request.form()).items()}
        return await run_in_threadpool(handler, request, form)

    return endpoint


def clean_message(text: str) -> str:
    """The message as stored: one newline style, no outer blanks; refused when unusable."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "").strip()
    if not text:
        raise Denied(400, "the message is empty")
    if len(text) > MAX_MESSAGE_CHARS:
        raise Denied(413, f"the message is longer than {MAX_MESSAGE_CHARS} characters")
    if any(separator.rstrip() in text for separator in SEPARATORS.values()):
        # a blank line then "Human:" would start a new turn in the HH transcript
        raise Denied(400, "a blank line followed by 'Human:' or 'Assistant:' is not allowed")
    return text


def sample_pair(settings: Settings, so_far: list[dict[str, str]], stop=None):
    """Two replies to the conversation, one per policy, in random order: (replies, models).
    Setting the event `stop` cuts the sampling short (the caller then discards it)."""
    sampling = {
        "max_new_tokens": settings.max_new_tokens,
        "min_new_tokens": settings.min_new_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "stop": stop,
    }
    first, second = settings.policies
    replies = [first.reply(so_far, **sampling), second.reply(so_far, **sampling)]
    for _ in range(3):  # identical replies make no comparison; sample B again
        if replies[0] != replies[1] or (stop is not None and stop.is_set()):
            break
        replies[1] = second.reply(so_far, **sampling)
    candidates = list(zip(replies, (first.model_id, second.model_id)))
    random.shuffle(candidates)  # the page shows A and B; neither position means a model
    (reply_a, model_a), (reply_b, model_b) = candidates
    return (reply_a, reply_b), (model_a, model_b)


def default_export_dir(db_path: str | Path) -> Path:
    """The export button's folder when serve is given none: beside the database.

    >>> default_export_dir("data/feedback.sqlite").as_posix()
    'data/feedback-export'
    """
    path = Path(db_path)
    return path.with_name(f"{path.stem}-export")


def settings_of(args, policies: tuple[Policy, Policy]) -> Settings:
    """The app's settings from `hhdata feedback serve`'s arguments and the loaded policies."""
    return Settings(
        db_path=args.db,
        policies=policies,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        rate_limit=args.rate_limit,
        export_dir=args.export_dir or str(default_export_dir(args.db)),
    )


def serve(args) -> int:
    """`hhdata feedback serve`: load the policies (failing early), then run uvicorn."""
    import uvicorn

    first = load_policy(args.policy)
    second = load_policy(args.policy_b) if args.policy_b else first
    db.connect(args.db).close()  # a bad --db path fails here, not at the first request
    settings = settings_of(args, (first, second))
    print(f"hhdata feedback: serving on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning")
    return 0
