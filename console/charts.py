"""Small charts rendered on the server as inline SVG: no chart library, no CDN.

The SVG has no viewBox: bars are placed in percentages of its width and its text is in
CSS pixels, so labels stay 12 px however narrow the card (a scaled viewBox shrank them).
The y axis's labels are HTML beside it, for the same reason.
"""

from collections.abc import Sequence
from datetime import datetime, timedelta

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

PLOT_HEIGHT = 120  # px; .chart-y in console.css has the same height
TICK_EVERY_HOURS = 6


def hourly_chart(series: Sequence[tuple[datetime, float]], *, unit: str,
                 empty: str) -> SafeString:
    """One bar per hour (``at`` starts the hour), with a y axis from 0 to the peak in
    ``unit`` and hour ticks on the x axis; ``empty``, a sentence, when nothing happened."""
    if not any(value for _, value in series):
        return format_html('<p class="chart-empty muted">{}</p>', empty)
    peak = max(value for _, value in series)
    slot = 100 / len(series)  # % of the width per hour
    bars, ticks = [], []
    for i, (at, value) in enumerate(series):
        height = value / peak * PLOT_HEIGHT
        bars.append((f"{(i + 0.15) * slot:.3f}%", f"{PLOT_HEIGHT - height:.1f}",
                     f"{slot * 0.7:.3f}%", f"{height:.1f}",
                     f"{at:%H:%M} to {at + timedelta(hours=1):%H:%M} UTC", _figure(value), unit))
        if at.hour % TICK_EVERY_HOURS == 0:
            ticks.append(_tick(i, slot, f"{at:%H:%M}"))
    first, last = series[0][0], series[-1][0]
    return format_html(
        '<figure class="chart">'
        '<p class="chart-unit">{unit}</p>'
        '<div class="chart-grid">'
        '<div class="chart-y" aria-hidden="true"><span>{peak}</span><span>0</span></div>'
        '<svg class="chart-plot" width="100%" height="{h}" role="img" aria-label="{label}">'
        '<line class="chart-axis" x1="0" y1="{base}" x2="100%" y2="{base}"></line>{bars}</svg>'
        '<span></span>'
        '<svg class="chart-x" width="100%" height="18" aria-hidden="true">{ticks}</svg>'
        '</div>'
        '<figcaption class="chart-x-title">hour (UTC)</figcaption>'
        '</figure>',
        unit=unit, peak=_figure(peak), h=PLOT_HEIGHT, base=PLOT_HEIGHT - 0.5,
        label=f"{unit} from {first:%H:%M} to {last:%H:%M} UTC; at most {_figure(peak)}",
        bars=format_html_join(
            "", '<rect x="{}" y="{}" width="{}" height="{}"><title>{}: {} {}</title></rect>',
            bars),
        ticks=format_html_join("", '<text x="{}%" y="13" text-anchor="{}">{}</text>', ticks),
    )


def _tick(i: int, slot: float, text: str) -> tuple[str, str, str]:
    """An x label centred under bar ``i``; at either edge, aligned to it so it stays whole."""
    centre = (i + 0.5) * slot
    if centre < 5:
        return f"{i * slot:.3f}", "start", text
    if centre > 95:
        return f"{(i + 1) * slot:.3f}", "end", text
    return f"{centre:.3f}", "middle", text


def _figure(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"
