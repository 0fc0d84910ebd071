"""Flag values of the quality report shared by ``train.py`` and ``quality_report.py`` (no torch: ``--help`` stays
fast)."""

from __future__ import annotations


def parse_strengths(parser, flag: str, text: str | None) -> tuple[float, ...]:
    """``"0.5,1"`` -> ``(0.5, 1.0)``: img2img strengths in (0, 1] for a flag; ``parser.error`` otherwise."""
    if not text:
        return ()
    try:
        values = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(0.0 < v <= 1.0 for v in values):
        parser.error(f"{flag} takes strengths in (0, 1], comma separated (e.g. 0.5), got {text!r}")
    return values
