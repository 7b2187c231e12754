"""A person at a browser, as HTTP: cookies, the CSRF token, no redirects followed."""

from __future__ import annotations

from typing import Any

import requests

TIMEOUT = 60


class Visitor:
    """One browser's cookies against ``base_url``. ``headers`` go with every request (e.g.
    X-Forwarded-For, as a proxy in front of the server would set it)."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        self.base_url = base_url
        self.session = requests.Session()
        self.session.headers.update(headers or {})

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.get(self.base_url + path, allow_redirects=False, timeout=TIMEOUT,
                                **kwargs)

    def post(self, path: str, data: Any = None, **kwargs: Any) -> requests.Response:
        """A form post with the CSRF token (the cookie's value, as a form field)."""
        if "csrftoken" not in self.session.cookies:
            self.get("/login/")  # any page with a form sets the cookie
        fields = dict(data or {})
        fields.setdefault("csrfmiddlewaretoken", self.session.cookies["csrftoken"])
        return self.session.post(self.base_url + path, data=fields, allow_redirects=False,
                                 timeout=TIMEOUT, **kwargs)

    def login(self, username: str, password: str, path: str = "/login/",
              **kwargs: Any) -> requests.Response:
        """The login form: 302 on success, 200 with the form again on a wrong password,
        429 once locked out."""
        self.get(path)
        return self.post(path, {"username": username, "password": password}, **kwargs)

    @property
    def signed_in(self) -> bool:
        return "sessionid" in self.session.cookies
