"""Charts as SVG drawn on the server: no script, no library, nothing fetched. A chart is a stack
of bars per step of a time axis, one colour per series, each bar's figure in its `<title>` (the
browser shows it on hover) and the largest total on the axis. Every label is escaped."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

__all__ = ["PALETTE", "bars", "number"]

PALETTE = (
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip
_WIDTH, _HEIGHT, _LEFT, _TOP, _BOTTOM = 720, 220, 64, 12, 40


def number(value: float) -> str:
    """A figure as the pages show it: whole numbers with thousands separators, small amounts
    with enough digits to tell them apart."""
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:,.2f}"
    return f"{value:.4g}"


def bars(
    title: str,
    steps: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    fmt: Callable[[float], str] = number,
    colours: Sequence[str] = PALETTE,
) -> Markup:
    """Stacked bars: one per step, one segment per series (each `values` as long as `steps`)."""
    totals = [sum(values[i] for _, values in series) for i in range(len(steps))]
    top = max(totals, default=0.0)
    head = (
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_WIDTH} '
        f'{_HEIGHT + 24 * ((len(series) + 3) // 4)}" role="img" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>"
    )
    if not steps or top <= 0:
        return Markup(  # noqa: S704 - every value in it was escaped above
            head + f'<text x="{_WIDTH // 2}" y="{_HEIGHT // 2}" text-anchor="middle" '
            'class="empty">No data in this range</text></svg>'
        )
    plot_w, plot_h = _WIDTH - _LEFT - 8, _HEIGHT - _TOP - _BOTTOM
    slot = plot_w / len(steps)
    width = max(1.0, slot * 0.8)
    parts = [
        head,
        f'<line x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{_WIDTH - 8}" y2="{_TOP + plot_h}" '
        'stroke="#888"/>',
        f'<text x="{_LEFT - 6}" y="{_TOP + 10}" text-anchor="end" class="axis">'
        f"{escape(fmt(top))}</text>",
        f'<text x="{_LEFT - 6}" y="{_TOP + plot_h}" text-anchor="end" class="axis">0</text>',
    ]
    every = max(1, len(steps) // 8)  # at most about eight labels under the axis
    for i, step in enumerate(steps):
        x = _LEFT + i * slot + (slot - width) / 2
        y = float(_TOP + plot_h)
        for s, (name, values) in enumerate(series):
            value = values[i]
            if value <= 0:
                continue
            h = plot_h * value / top
            y -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{h:.1f}" '
                f'fill="{colours[s % len(colours)]}"><title>{escape(step)} · {escape(name)}: '
                f"{escape(fmt(value))}</title></rect>"
            )
        if i % every == 0:
            parts.append(
                f'<text x="{x + width / 2:.1f}" y="{_TOP + plot_h + 16}" text-anchor="middle" '
                f'class="axis">{escape(step)}</text>'
            )
    for s, (name, _) in enumerate(series):
        lx, ly = 8 + (s % 4) * 178, _HEIGHT + 4 + 24 * (s // 4)
        parts.append(
            f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{colours[s % len(colours)]}"/>'
            f'<text x="{lx + 18}" y="{ly + 11}" class="legend">{escape(_short(name))}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every label and figure in it is escaped


def _short(name: str, most: int = 24) -> str:
    return name if len(name) <= most else name[: most - 1] + "…"
