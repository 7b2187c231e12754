"""A fake Stripe API on 127.0.0.1: transfers, payouts, reversals, with Stripe's idempotency.

Enough of Stripe for `create_payouts` and its crash tests, served over real HTTP
to the real stripe-python client in another process::

    with FakeStripe() as fake:
        env = server_env(url, STRIPE_API_KEY="sk_test_fake", STRIPE_API_BASE=fake.url)

What it does like Stripe:

* ``Authorization: Bearer sk_test_…`` is required (401 otherwise);
* form-encoded bodies; nested keys such as ``metadata[payout_console_payout]`` are
  kept as sent in ``Request.params`` and become ``{"metadata": {...}}`` in objects;
* idempotency per (connected account, ``Idempotency-Key``): the same key with the
  same method, path and parameters answers the first response again (same object,
  ``Idempotent-Replayed: true``); with anything different, HTTP 400
  ``idempotency_error``. A result is kept once the endpoint started: a success, a
  400 such as ``payouts_not_allowed``, and a ``500`` too (replayed as it was). A
  request refused before it started (bad key, missing parameter, a 429 or 409)
  keeps nothing, so the same key can be sent again;
* a key is kept for 24 hours of the fake's clock (``advance`` moves it), then
  forgotten: the same key then makes a new object, as Stripe does after pruning;
* ``POST /v1/payouts`` is made on the connected account named by ``Stripe-Account``
  (this fake refuses it without one: the console never pays out platform money);
* lists, newest first, ``limit`` and ``starting_after``: ``GET /v1/transfers``
  (``transfer_group``), ``GET /v1/payouts`` on the ``Stripe-Account`` (``created[gte]``);
* ``GET /v1/payouts/{id}`` finds a payout only on the account it belongs to (404
  ``resource_missing`` elsewhere, as Stripe does);
* events: every payout change made here (``POST /v1/payouts``, ``add_payout``,
  ``set_status``) records the event Stripe would send, on the payout's account.
  ``GET /v1/events`` lists them newest first for the ``Stripe-Account`` (the
  platform's without it), with ``type`` (one name, or a group such as ``payout.*``),
  ``types[]``, ``created[gte|gt|lte|lt]``, ``limit``, ``starting_after`` and
  ``ending_before``; events older than 30 days of the fake's clock are gone;
* every answer has ``Request-Id`` and a ``Date`` from the fake's clock.

Controls for tests: ``fail_payouts_for``, ``revoke`` (401 or 403 on a connected account),
``fail_next`` (with ``Stripe-Should-Retry``),
``slow_next`` (an answer later than the client's timeout), ``garble_next`` (a body that
is not JSON), ``advance``, and crash points ``hold(prefix, when="before"|"after")`` /
``wait_held`` / ``release``.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from payouts import stripe_events

HOLD_LIMIT_S = 120  # a held request never blocks a server thread longer than this
IDEMPOTENCY_MISMATCH = (
    "Keys for idempotent requests can only be used with the same parameters they were first "
    "used with. Try using a key other than '{key}' if you meant to execute a different request."
)
ERROR_TYPES = {429: "rate_limit_error", 409: "idempotency_error"}
# Refused before the endpoint starts: nothing is kept for the idempotency key.
NOT_STARTED = (409, 429)
KEY_KEPT_S = 24 * 3600
TRANSFER_REVERSALS = re.compile(r"^/v1/transfers/(?P<id>[^/]+)/reversals$")
ONE_OBJECT = re.compile(r"^/v1/(?P<kind>transfers|payouts)/(?P<id>[^/]+)$")
DAY = 86400
EVENTS_KEPT_S = 30 * DAY
# The event Stripe sends when a payout reaches each status.
EVENT_OF_STATUS = {"in_transit": "payout.updated", "paid": "payout.paid",
                   "failed": "payout.failed", "canceled": "payout.canceled",
                   "pending": "payout.updated"}
NOT_JSON = b"<html><body><h1>502 Bad Gateway</h1></body></html>"


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass
class Request:
    """One request as the fake saw it, and what it answered."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    params: dict[str, str]  # form fields as sent: "metadata[payout_console_payout]": "pcp_…"
    status: int = 0  # 0 while not answered (or held before processing)
    response: dict[str, Any] | None = None
    replayed: bool = False
    held: str = ""  # "before" / "after" if this request was held

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")

    @property
    def account(self) -> str | None:
        return self.headers.get("stripe-account")


@dataclass
class _Hold:
    prefix: str
    when: str
    request: Request | None = None
    ready: bool = False  # the request is now waiting for release()
    released: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)  # processed (or dropped)


class _Answer(Exception):
    """An HTTP answer from inside request processing; ``keep`` stores it for the key."""

    def __init__(self, status: int, body: dict[str, Any], *, keep: bool) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.keep = keep


def _error(status: int, type_: str, message: str, *, code: str | None = None,
           param: str | None = None, keep: bool = False) -> _Answer:
    body: dict[str, Any] = {"type": type_, "message": message}
    if code:
        body["code"] = code
        body["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
    if param:
        body["param"] = param
    body["request_log_url"] = "https://dashboard.stripe.com/test/logs/" + new_id("req")
    return _Answer(status, {"error": body}, keep=keep)


def nested(params: dict[str, str], name: str) -> dict[str, str]:
    """``{"metadata[a]": "1"}`` → ``{"a": "1"}`` for ``name="metadata"``."""
    prefix = f"{name}["
    return {key[len(prefix):-1]: value for key, value in params.items()
            if key.startswith(prefix) and key.endswith("]")}


class FakeStripe:
    """The fake API: a ThreadingHTTPServer on a free 127.0.0.1 port, in a daemon thread."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._held_cond = threading.Condition(self._lock)
        self.requests: list[Request] = []
        self.transfers: dict[str, dict[str, Any]] = {}
        self.payouts: dict[str, dict[str, Any]] = {}
        self.reversals: dict[str, dict[str, Any]] = {}
        self.payout_accounts: dict[str, str] = {}  # po_… -> acct_… it was made on ("": platform)
        self.events: list[tuple[str, dict[str, Any]]] = []  # (account or "", event), oldest first
        # (account, key) -> (method, path, params, status, body, request id, saved at)
        self._idempotent: dict[tuple[str | None, str], tuple[Any, ...]] = {}
        self._payout_failures: dict[str, str] = {}  # acct_… -> error code
        # (path prefix, status, Stripe-Should-Retry or None), one shot each
        self._failures: list[tuple[str, int, bool | None]] = []
        self._slow: list[tuple[str, float]] = []  # (path prefix, seconds), one shot each
        self._revoked: dict[str, int] = {}  # connected accounts the key lost -> status
        self._garbled: list[tuple[str]] = []  # path prefixes answered once with a body not JSON
        self._holds: list[_Hold] = []  # armed, not yet matched
        self._holding: list[_Hold] = []  # matched a request, not released yet
        self._offset_s = 0  # the fake's clock runs ahead of the real one by this much
        self._last_created = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, port: int = 0) -> FakeStripe:
        fake = self

        class Handler(_Handler):
            pass

        Handler.fake = fake
        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"fakestripe-{port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release(timeout=5)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> FakeStripe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- controls ---------------------------------------------------------------------------

    def fail_payouts_for(self, account: str, code: str = "payouts_not_allowed") -> None:
        """Every payout creation on ``account`` fails for good (HTTP 400, ``code``)."""
        with self._lock:
            self._payout_failures[account] = code

    def allow_payouts_for(self, account: str) -> None:
        with self._lock:
            self._payout_failures.pop(account, None)

    def fail_next(self, path_prefix: str, status: int = 500, *,
                  should_retry: bool | None = None) -> None:
        """The next request whose path starts with ``path_prefix`` gets a transient error
        (5xx, 429, 409) and makes nothing. A 5xx is kept for its idempotency key and
        replayed for 24 hours, as Stripe does; a 429 or 409 keeps nothing.
        ``should_retry`` sends ``Stripe-Should-Retry: true|false`` with it."""
        with self._lock:
            self._failures.append((path_prefix, status, should_retry))

    def revoke(self, account: str, status: int = 401) -> None:
        """The platform loses access to ``account`` (disconnected, deleted): every request
        on it is refused, with 401 (Stripe's usual answer) or 403, and Stripe's words."""
        with self._lock:
            self._revoked[account] = status

    def slow_next(self, path_prefix: str, seconds: float) -> None:
        """The next matching request is answered only after ``seconds``."""
        with self._lock:
            self._slow.append((path_prefix, seconds))

    def garble_next(self, path_prefix: str) -> None:
        """The next matching request gets HTTP 200 with a body that is not JSON (a proxy's
        error page); nothing is made."""
        with self._lock:
            self._garbled.append((path_prefix,))

    # --- payouts changing at Stripe, with their events ----------------------------------

    def add_payout(self, payout: dict[str, Any], account: str = "", *,
                   events: bool = True) -> dict[str, Any]:
        """A payout Stripe made on ``account`` ("" for the platform), e.g. an automatic
        one; with ``events``, its ``payout.created`` is recorded."""
        with self._lock:
            payout = copy.deepcopy(payout)
            self.payouts[payout["id"]] = payout
            self.payout_accounts[payout["id"]] = account
            if events:
                self._emit("payout.created", payout["id"])
            return payout

    def set_status(self, payout_id: str, status: str, *, events: bool = True,
                   **fields: Any) -> dict[str, Any]:
        """The payout moves to ``status`` (and ``fields``, e.g. failure_code), and Stripe
        records its event (``payout.updated`` with ``previous_attributes`` for in_transit,
        ``payout.paid`` / ``failed`` / ``canceled``); ``events=False`` changes it silently
        (as if the event is past the Events API's 30 days)."""
        with self._lock:
            payout = self.payouts[payout_id]
            previous = {"status": payout["status"]}
            payout.update(status=status, **fields)
            if status in ("failed", "canceled"):
                payout["failure_balance_transaction"] = new_id("txn")
            if events:
                self._emit(EVENT_OF_STATUS[status], payout_id, previous=previous)
            return copy.deepcopy(payout)

    def _emit(self, event_type: str, payout_id: str, *,
              previous: dict[str, Any] | None = None) -> dict[str, Any]:
        account = self.payout_accounts[payout_id]
        event = stripe_events.payout_event(
            event_type, copy.deepcopy(self.payouts[payout_id]), account=account or None,
            created=self._created(), previous_attributes=previous)
        self.events.append((account, event))
        return event

    def events_of(self, account: str = "") -> list[dict[str, Any]]:
        with self._lock:
            return [event for owner, event in self.events if owner == account]

    def now(self) -> int:
        """The fake's clock, in Unix seconds."""
        return int(time.time()) + self._offset_s

    def advance(self, seconds: float) -> None:
        """Move the fake's clock ahead (idempotency keys older than 24 h are forgotten)."""
        with self._lock:
            self._offset_s += int(seconds)

    def _created(self) -> int:
        """A ``created`` time: the clock, made strictly increasing so order is testable."""
        self._last_created = max(self._last_created + 1, self.now())
        return self._last_created

    def clock(self) -> int:
        """What the fake says the time is (its ``Date``): never before what it made."""
        return max(self.now(), self._last_created)

    def hold(self, path_prefix: str, when: str = "before") -> None:
        """Block the next matching request until ``release()``: ``before`` it is processed
        (nothing created yet) or ``after`` (created and kept for its key, answer withheld)."""
        if when not in ("before", "after"):
            raise ValueError("when must be 'before' or 'after'")
        with self._lock:
            self._holds.append(_Hold(path_prefix, when))

    def wait_held(self, timeout: float = 30) -> Request:
        """Return the request being held (the oldest), once there is one."""
        deadline = time.monotonic() + timeout
        with self._held_cond:
            while True:
                ready = [h for h in self._holding if h.ready]
                if ready:
                    assert ready[0].request is not None
                    return ready[0].request
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no request was held within {timeout} s; "
                                       f"seen: {[(r.method, r.path) for r in self.requests]}")
                self._held_cond.wait(left)

    def release(self, timeout: float = 30) -> None:
        """Let every held request go on, and wait until each has been processed."""
        with self._lock:
            holding, self._holding = list(self._holding), []
            self._holds.clear()
        for each in holding:
            each.released.set()
        deadline = time.monotonic() + timeout
        for each in holding:
            if not each.done.wait(max(deadline - time.monotonic(), 0)):
                raise TimeoutError(f"held request {each.request} did not finish")

    # --- what tests read --------------------------------------------------------------------

    def seen(self, method: str = "POST", path_prefix: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.requests
                    if r.method == method and r.path.startswith(path_prefix)]

    def replays(self, path_prefix: str = "") -> list[Request]:
        return [r for r in self.seen("POST", path_prefix) if r.replayed]

    # --- processing (called by the handler) ----------------------------------------------

    def _take(self, items: list[Any], path: str) -> Any:
        for each in items:
            prefix = each[0] if isinstance(each, tuple) else each.prefix
            if path.startswith(prefix):
                items.remove(each)
                return each
        return None

    def handle(self, request: Request) -> tuple[int, dict[str, Any] | bytes, dict[str, str]]:
        with self._lock:
            slow = self._take(self._slow, request.path)
        if slow is not None:
            time.sleep(slow[1])
        with self._lock:
            self.requests.append(request)
            if self._take(self._garbled, request.path) is not None:
                request.status = 200
                return 200, NOT_JSON, {"Request-Id": new_id("req")}
            hold = self._take(self._holds, request.path) if request.method == "POST" else None
            if hold is not None:
                hold.request = request
                request.held = hold.when
                self._holding.append(hold)
        if hold is None:
            return self._process(request)
        try:
            if hold.when == "before":
                self._wait_released(hold)
                return self._process(request)
            answer = self._process(request)
            self._wait_released(hold)
            return answer
        finally:
            hold.done.set()

    def _wait_released(self, hold: _Hold) -> None:
        with self._held_cond:
            hold.ready = True
            self._held_cond.notify_all()
        hold.released.wait(HOLD_LIMIT_S)

    def _process(self, request: Request) -> tuple[int, dict[str, Any], dict[str, str]]:
        headers = {"Request-Id": new_id("req")}
        key = request.idempotency_key
        if key:
            headers["Idempotency-Key"] = key
        with self._lock:
            try:
                self._authenticate(request)
                if request.account in self._revoked:
                    status = self._revoked[request.account]
                    raise _error(status, "invalid_request_error" if status == 401
                                 else "permission_error",
                                 "The provided key 'sk_test_…' does not have access to account "
                                 f"'{request.account}' (or that account does not exist). "
                                 "Application access may have been revoked.")
                scope = (request.account, key or "")
                kept = self._idempotent.get(scope) if request.method == "POST" and key else None
                if kept is not None and self.now() - kept[6] >= KEY_KEPT_S:
                    del self._idempotent[scope]  # pruned: the key makes a new request
                    kept = None
                failure = self._take(self._failures, request.path) if kept is None else None
                if failure is not None:
                    _, status, should_retry = failure
                    if should_retry is not None:
                        headers["Stripe-Should-Retry"] = "true" if should_retry else "false"
                    raise _error(status, ERROR_TYPES.get(status, "api_error"),
                                 f"An injected transient error ({status}) from the fake Stripe.",
                                 keep=status not in NOT_STARTED)
                if kept is not None:  # (a POST with a key)
                    method, path, params, status, body, original, _ = kept
                    if (method, path, params) != (request.method, request.path, request.params):
                        raise _error(400, "idempotency_error", IDEMPOTENCY_MISMATCH.format(key=key))
                    request.replayed = True
                    headers.update({"Idempotent-Replayed": "true", "Original-Request": original})
                    return self._answered(request, status, body, headers)
                return self._kept(request, 200, self._route(request), headers)
            except _Answer as answer:
                if answer.keep:
                    return self._kept(request, answer.status, answer.body, headers)
                return self._answered(request, answer.status, answer.body, headers)

    def _kept(self, request: Request, status: int, body: dict[str, Any],
              headers: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
        """The endpoint started: its answer is kept for the request's idempotency key."""
        key = request.idempotency_key
        if request.method == "POST" and key:
            self._idempotent[(request.account, key)] = (
                request.method, request.path, dict(request.params), status, body,
                headers["Request-Id"], self.now())
        return self._answered(request, status, body, headers)

    def _answered(self, request: Request, status: int, body: dict[str, Any],
                  headers: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
        request.status, request.response = status, body
        return status, body, headers

    def _authenticate(self, request: Request) -> None:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            raise _error(401, "invalid_request_error",
                         "You did not provide an API key. You need to provide your API key in "
                         "the Authorization header, using Bearer auth.")
        api_key = auth[len("Bearer "):]
        if not api_key.startswith("sk_test_") or len(api_key) <= len("sk_test_"):
            shown = (api_key[:8] + "*" * (len(api_key) - 12) + api_key[-4:]
                     if len(api_key) > 16 else "*" * len(api_key))
            raise _error(401, "invalid_request_error",
                         f"Invalid API Key provided: {shown}", code="api_key_invalid")

    def _route(self, request: Request) -> dict[str, Any]:
        path, method = request.path, request.method
        if method == "POST" and path == "/v1/transfers":
            return self._transfer_create(request)
        if method == "POST" and path == "/v1/payouts":
            return self._payout_create(request)
        match = TRANSFER_REVERSALS.match(path)
        if method == "POST" and match:
            return self._reversal_create(request, match["id"])
        if method == "GET" and path == "/v1/transfers":
            group = request.params.get("transfer_group")
            return self._list(request, [t for t in self.transfers.values()
                                        if group is None or t["transfer_group"] == group])
        if method == "GET" and path == "/v1/payouts":
            since = int(request.params.get("created[gte]") or 0)
            return self._list(request, [p for p_id, p in self.payouts.items()
                                        if self.payout_accounts[p_id] == (request.account or "")
                                        and p["created"] >= since])
        if method == "GET" and path == "/v1/events":
            return self._list(request, self._events_listed(request))
        match = ONE_OBJECT.match(path)
        if method == "GET" and match:
            if match["kind"] == "transfers" and match["id"] in self.transfers:
                return self.transfers[match["id"]]
            if (match["kind"] == "payouts" and match["id"] in self.payouts
                    and self.payout_accounts[match["id"]] == (request.account or "")):
                return self.payouts[match["id"]]
            raise self._missing(match["id"])
        raise _error(404, "invalid_request_error",
                     f"Unrecognized request URL ({method}: {path}).")

    def _events_listed(self, request: Request) -> list[dict[str, Any]]:
        """The account's events (the platform's without ``Stripe-Account``) still kept,
        filtered by ``type`` / ``types[]`` and ``created[...]``."""
        params = request.params
        types = [v for k, v in params.items() if k.startswith("types[")]
        if "type" in params:
            types.append(params["type"])
        bounds = {op: int(params[f"created[{op}]"]) for op in ("gte", "gt", "lte", "lt")
                  if f"created[{op}]" in params}
        if "created" in params:
            bounds["eq"] = int(params["created"])

        def matches(event: dict[str, Any]) -> bool:
            created, name = event["created"], event["type"]
            if types and not any(name == t or (t.endswith(".*") and name.startswith(t[:-1]))
                                 for t in types):
                return False
            return all({"gte": created >= v, "gt": created > v, "lte": created <= v,
                        "lt": created < v, "eq": created == v}[op] for op, v in bounds.items())

        oldest_kept = self.now() - EVENTS_KEPT_S
        return [copy.deepcopy(event) for owner, event in self.events
                if owner == (request.account or "") and event["created"] >= oldest_kept
                and matches(event)]

    @staticmethod
    def _list(request: Request, objects: list[dict[str, Any]]) -> dict[str, Any]:
        """Stripe's list: newest first, ``limit`` (1-100, default 10), ``starting_after``
        or ``ending_before``."""
        objects = sorted(objects, key=lambda o: (o["created"], o["id"]), reverse=True)
        ids = [o["id"] for o in objects]
        for param in ("starting_after", "ending_before"):
            cursor = request.params.get(param)
            if cursor and cursor not in ids:
                raise _error(400, "invalid_request_error", f"No such object: '{cursor}'",
                             code="resource_missing", param=param)
        limit = max(1, min(100, int(request.params.get("limit") or 10)))
        before = request.params.get("ending_before")
        if before:  # the page just newer than the cursor
            newer = objects[:ids.index(before)]
            return {"object": "list", "url": request.path, "has_more": len(newer) > limit,
                    "data": newer[-limit:]}
        after = request.params.get("starting_after")
        if after:
            objects = objects[ids.index(after) + 1:]
        return {"object": "list", "url": request.path, "has_more": len(objects) > limit,
                "data": objects[:limit]}

    @staticmethod
    def _missing(object_id: str) -> _Answer:
        kind = {"tr": "transfer", "po": "payout"}.get(object_id.split("_")[0], "object")
        return _error(404, "invalid_request_error", f"No such {kind}: '{object_id}'",
                      code="resource_missing", param="id")

    @staticmethod
    def _required(request: Request, *names: str) -> None:
        for name in names:
            if not request.params.get(name):
                raise _error(400, "invalid_request_error", f"Missing required param: {name}.",
                             code="parameter_missing", param=name)

    @staticmethod
    def _amount(request: Request) -> int:
        try:
            amount = int(request.params["amount"])
        except ValueError:
            raise _error(400, "invalid_request_error", "Invalid integer: "
                         f"{request.params['amount']}", code="parameter_invalid_integer",
                         param="amount") from None
        if amount <= 0:
            raise _error(400, "invalid_request_error", "Amount must be at least 1.",
                         code="amount_too_small", param="amount")
        return amount

    def _transfer_create(self, request: Request) -> dict[str, Any]:
        self._required(request, "amount", "currency", "destination")
        amount = self._amount(request)
        transfer_id = new_id("tr")
        transfer = {
            "id": transfer_id,
            "object": "transfer",
            "amount": amount,
            "amount_reversed": 0,
            "balance_transaction": new_id("txn"),
            "created": self._created(),
            "currency": request.params["currency"].lower(),
            "description": request.params.get("description"),
            "destination": request.params["destination"],
            "destination_payment": new_id("py"),
            "livemode": False,
            "metadata": nested(request.params, "metadata"),
            "reversals": {"object": "list", "data": [], "has_more": False, "total_count": 0,
                          "url": f"/v1/transfers/{transfer_id}/reversals"},
            "reversed": False,
            "source_transaction": None,
            "source_type": "card",
            "transfer_group": request.params.get("transfer_group"),
        }
        self.transfers[transfer_id] = transfer
        return transfer

    def _payout_create(self, request: Request) -> dict[str, Any]:
        account = request.account
        if not account:
            raise _error(400, "invalid_request_error",
                         "This fake Stripe makes payouts only on a connected account: send "
                         "the Stripe-Account header.", param="Stripe-Account")
        self._required(request, "amount", "currency")
        amount = self._amount(request)
        code = self._payout_failures.get(account)
        if code is not None:  # the endpoint ran and refused: kept for the key
            raise _error(400, "invalid_request_error",
                         f"Payouts are not allowed on account {account} ({code}).",
                         code=code, keep=True)
        created = self._created()
        payout_id = new_id("po")
        payout = {
            "id": payout_id,
            "object": "payout",
            "amount": amount,
            "application_fee": None,
            "application_fee_amount": None,
            "arrival_date": created + 2 * DAY,
            "automatic": False,
            "balance_transaction": new_id("txn"),
            "created": created,
            "currency": request.params["currency"].lower(),
            "description": request.params.get("description"),
            "destination": new_id("ba"),
            "failure_balance_transaction": None,
            "failure_code": None,
            "failure_message": None,
            "livemode": False,
            "metadata": nested(request.params, "metadata"),
            "method": request.params.get("method", "standard"),
            "original_payout": None,
            "reconciliation_status": "not_applicable",
            "reversed_by": None,
            "source_type": "card",
            "statement_descriptor": request.params.get("statement_descriptor"),
            "status": "pending",
            "type": "bank_account",
        }
        self.payouts[payout_id] = payout
        self.payout_accounts[payout_id] = account
        self._emit("payout.created", payout_id)
        return payout

    def _reversal_create(self, request: Request, transfer_id: str) -> dict[str, Any]:
        transfer = self.transfers.get(transfer_id)
        if transfer is None:
            raise self._missing(transfer_id)
        left = transfer["amount"] - transfer["amount_reversed"]
        amount = self._amount(request) if "amount" in request.params else left
        if left <= 0:
            raise _error(400, "invalid_request_error",
                         f"Transfer {transfer_id} is already fully reversed.", keep=True)
        if amount > left:
            raise _error(400, "invalid_request_error",
                         f"Amount ({amount}) is greater than the unreversed amount ({left}).",
                         param="amount", keep=True)
        reversal = {
            "id": new_id("trr"),
            "object": "transfer_reversal",
            "amount": amount,
            "balance_transaction": new_id("txn"),
            "created": self._created(),
            "currency": transfer["currency"],
            "destination_payment_refund": new_id("pyr"),
            "metadata": nested(request.params, "metadata"),
            "source_refund": None,
            "transfer": transfer_id,
        }
        self.reversals[reversal["id"]] = reversal
        transfer["amount_reversed"] += amount
        transfer["reversed"] = transfer["amount_reversed"] >= transfer["amount"]
        transfer["reversals"]["data"].append(reversal)
        transfer["reversals"]["total_count"] += 1
        return reversal


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the API does
    # Headers and body go out in separate writes: without this, Nagle's algorithm and
    # delayed ACKs add ~40 ms to every answer on loopback.
    disable_nagle_algorithm = True
    server_version = "nginx"
    sys_version = ""
    fake: FakeStripe

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def date_time_string(self, timestamp: float | None = None) -> str:
        return formatdate(self.fake.clock(), usegmt=True)  # the fake's clock, not ours

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode("utf-8") if length else ""
        path, _, query = self.path.partition("?")
        fields = parse_qs(raw if method == "POST" else query, keep_blank_values=True)
        params = {key: values[-1] for key, values in fields.items()}
        request = Request(method, path, {k.lower(): v for k, v in self.headers.items()}, params)
        status, body, headers = self.fake.handle(request)
        data = body if isinstance(body, bytes) else json.dumps(body, indent=2).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Stripe-Version", request.headers.get("stripe-version",
                                                                   "2025-09-30.clover"))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client is gone (killed while its request was held)
            self.close_connection = True
