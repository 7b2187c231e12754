"""Small charts rendered on the server as inline SVG: no chart library, no CDN."""

from collections.abc import Sequence

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString


def bar_chart(points: Sequence[tuple[str, float]], *, width: int = 480, height: int = 90,
              label: str = "") -> SafeString:
    """Vertical bars, one per (label, value); each bar's tooltip gives its figures."""
    if not points:
        return format_html('<p class="muted">No data in this window.</p>')
    peak = max(value for _, value in points)
    top = peak or 1  # an all-zero series draws flat bars
    gap = 2
    bar_w = max((width - gap * len(points)) / len(points), 1)
    rows = []
    for i, (name, value) in enumerate(points):
        bar_h = value / top * (height - 12)
        rows.append((f"{i * (bar_w + gap):.1f}", f"{height - bar_h:.1f}", f"{bar_w:.1f}",
                     f"{bar_h:.1f}", name, _figure(value)))
    bars = format_html_join(
        "", '<rect x="{}" y="{}" width="{}" height="{}"><title>{}: {}</title></rect>', rows)
    return format_html(
        '<svg class="chart" viewBox="0 0 {} {}" width="100%" height="{}" role="img" '
        'aria-label="{}"><text x="0" y="10" class="chart-max">{}</text>{}</svg>',
        width, height, height, label, f"max {_figure(peak)}" if peak else "none", bars,
    )


def _figure(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"
