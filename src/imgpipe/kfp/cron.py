"""KFP recurring-run cron expressions: six fields, seconds first, checked before a schedule is made.

validate_cron("0 0 3 * * *")  # 03:00:00 every day; a five-field crontab line is refused with the six-field form
"""

from __future__ import annotations

import re

__all__ = ["validate_cron"]

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
# name, lowest, highest, names for lowest.. (month names start at 1, day names at 0), '?' allowed
_CRON_FIELDS = (
    ("second", 0, 59, (), False),
    ("minute", 0, 59, (), False),
    ("hour", 0, 23, (), False),
    ("day of month", 1, 31, (), True),
    ("month", 1, 12, _MONTHS, False),
    ("day of week", 0, 6, _DAYS, True),
)
_CRON_ITEM = re.compile(r"^(?P<base>\*|\?|[A-Za-z0-9]+(?:-[A-Za-z0-9]+)?)(?:/(?P<step>\d+))?$")


def _cron_value(text: str, name: str, low: int, high: int, names: tuple[str, ...]) -> int:
    if names and text.upper() in names:
        return names.index(text.upper()) + low
    if not text.isdigit():
        raise ValueError(f"{name} {text!r} is not a number" + (f" or one of {','.join(names)}" if names else ""))
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{name} {value} is outside {low}-{high}")
    return value


def validate_cron(expression: str) -> str:
    """Checks a KFP cron expression and returns it with single spaces.

    KFP recurring runs take six fields, seconds first: ``second minute hour
    day-of-month month day-of-week`` (``"0 0 3 * * *"`` is 03:00:00 every day). A
    five-field crontab line is refused with the six-field form to use instead.

    Raises:
        ValueError: Saying which field is wrong and why.
    """
    fields = (expression or "").split()
    example = "e.g. '0 0 3 * * *' for 03:00:00 every day"
    if len(fields) == 5:
        raise ValueError(f"cron {expression!r} has 5 fields (crontab style); KFP schedules take 6, seconds first: {'0 ' + ' '.join(fields)!r}")
    if len(fields) != 6:
        raise ValueError(
            f"cron {expression!r} has {len(fields)} field(s); KFP schedules take 6 (second minute hour day-of-month month day-of-week), {example}"
        )
    for text, (name, low, high, names, question) in zip(fields, _CRON_FIELDS):
        for item in text.split(","):
            m = _CRON_ITEM.match(item)
            try:
                if not m:
                    raise ValueError(f"{name} {item!r} is not '*', '?', N, N-M or one of those with /STEP")
                base, step = m.group("base"), m.group("step")
                if base == "?" and not question:
                    raise ValueError(f"'?' is only valid for day of month and day of week, not {name}")
                if step is not None and int(step) < 1:
                    raise ValueError(f"{name} step must be >= 1")
                if base not in ("*", "?"):
                    ends = [_cron_value(v, name, low, high, names) for v in base.split("-")]
                    if len(ends) == 2 and ends[0] > ends[1]:
                        raise ValueError(f"{name} range {base!r} runs backwards")
            except ValueError as exc:
                raise ValueError(f"cron {expression!r}: {exc} ({example})") from None
    return " ".join(fields)
