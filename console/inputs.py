"""What the console takes from the address bar or a form, checked in one place.

- Page sizes: ``?per_page=`` is honoured up to ``MAX_PER_PAGE``; anything else (not a
  number, zero, negative, huge) falls back to the default, so no query string can make a
  list page fetch and render the whole table.
- ``next``: where a form sends the browser back to. Only a path on this site (as
  ``url_has_allowed_host_and_scheme`` decides) is followed; anything else, such as
  ``https://evil.example/x`` or ``//evil.example``, falls back to the view's own page.
"""

from django.core.paginator import EmptyPage
from django.http import HttpRequest
from django.utils.http import url_has_allowed_host_and_scheme
from django_tables2 import RequestConfig, Table

PER_PAGE = 25
MAX_PER_PAGE = 100


def page_size(value: str | None, default: int = PER_PAGE) -> int:
    """``value`` as a page size: 1 to MAX_PER_PAGE, otherwise ``default``."""
    try:
        size = int(value or "")
    except ValueError:
        return default
    return size if 1 <= size <= MAX_PER_PAGE else default


def page_number(value: str | None) -> int:
    try:
        return max(1, int(value or ""))
    except ValueError:
        return 1


def configure_table(request: HttpRequest, table: Table) -> Table:
    """Sorting from the query string (django-tables2's RequestConfig) and pagination with
    a checked page size: every paginated list of the console goes through here."""
    RequestConfig(request, paginate=False).configure(table)  # ordering, and table.request
    size = page_size(request.GET.get(table.prefixed_per_page_field))
    number = page_number(request.GET.get(table.prefixed_page_field))
    try:
        table.paginate(per_page=size, page=number)
    except EmptyPage:  # past the last page: the last page
        table.page = table.paginator.page(table.paginator.num_pages)
    return table


def safe_next(request: HttpRequest, default: str) -> str:
    """The ``next`` a form posted (or a link carried), if it stays on this site; else
    ``default``."""
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target and url_has_allowed_host_and_scheme(
            target, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
        return target
    return default
