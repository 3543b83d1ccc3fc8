#!/usr/bin/env python3
"""Draws a rhyve boot timeline as an SVG.

    rhyve -o debug.timeline=boot.txt ... vmname
    scripts/boot-timeline.py boot.txt > boot.svg

boot.txt has one "milliseconds event" line per step (rhyve writes it; '#' lines are
comments). Each event is a row: a bar from time 0 to the event, its time, and its name, so
where a boot's time went reads from top to bottom.
"""
import html
import sys


def read(path):
    events = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            ms, _, name = line.partition(" ")
            try:
                events.append((float(ms), name))
            except ValueError:
                sys.exit(f"boot-timeline: {path}: not 'ms event': {line!r}")
    if not events:
        sys.exit(f"boot-timeline: {path}: no events")
    return sorted(events)


def svg(events):
    width, left, right, row, top = 1000, 10, 330, 22, 40
    end = max(ms for ms, _ in events) or 1.0
    scale = (width - left - right) / end
    height = top + row * len(events) + 30
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="monospace" font-size="12">',
        f'<text x="{left}" y="20" font-size="14">rhyve boot timeline: {end:.1f} ms '
        "from exec to the last event</text>",
    ]
    # Time axis: ten ticks.
    for i in range(11):
        t = end * i / 10
        x = left + t * scale
        out.append(f'<line x1="{x:.1f}" y1="{top - 8}" x2="{x:.1f}" y2="{height - 25}" '
                   'stroke="#ddd"/>')
        out.append(f'<text x="{x:.1f}" y="{height - 10}" text-anchor="middle">{t:.0f}</text>')
    prev = 0.0
    for i, (ms, name) in enumerate(events):
        y = top + i * row
        x0, x1 = left + prev * scale, left + ms * scale
        out.append(f'<rect x="{left}" y="{y}" width="{max(x0 - left, 0):.1f}" height="14" '
                   'fill="#cfe0f5"/>')
        out.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 1):.1f}" height="14" '
                   'fill="#3b78c4"/>')
        label = f"{ms:9.1f} ms  +{ms - prev:7.1f}  {html.escape(name)}"
        out.append(f'<text x="{width - right + 10}" y="{y + 11}">{label}</text>')
        prev = ms
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: scripts/boot-timeline.py TIMELINE > boot.svg")
    sys.stdout.write(svg(read(sys.argv[1])))


if __name__ == "__main__":
    main()
