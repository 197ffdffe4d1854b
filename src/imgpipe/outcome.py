"""Degenerate outcomes: a committed step output that is empty or lopsided is an error, not a success.

    check_download(report)                 # no image kept from any source
    check_clean(report, min_classes=2, min_images_per_class=1, min_images_per_split=1, fractions=cfg.split)

A step commits its output first (so its rejects table can be read: it says why nothing was
kept), then calls these; a failing check raises :class:`DegenerateOutput`, which the CLI and
the kfp components turn into a one-line message and a non-zero exit. Each message says what
was found, what the rejects table holds and what to change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from imgpipe.contract import REJECTS, StepReport, dest_uri

__all__ = ["DegenerateOutput", "check_download", "check_clean", "check_rows"]


class DegenerateOutput(ValueError):
    """A step kept nothing, or left a class or a split below its minimum."""


def _why(report: StepReport) -> str:
    if not report.rejected:
        return "nothing was rejected either"
    top = sorted(report.rejects_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
    reasons = ", ".join(f"{reason} {count}" for reason, count in top)
    return f"rejected {report.rejected} ({reasons}); every rejected input and its reason is in {dest_uri(report.dest, REJECTS)}"


def check_rows(report: StepReport, what: str, fix: str) -> None:
    """Raises when ``report`` kept no row.

    Args:
        report: The committed report.
        what: What the inputs were, for the message (``"the sources"``).
        fix: What the user can change.
    """
    if report.outputs == 0:
        raise DegenerateOutput(f"{report.step} kept no image from {report.inputs} input(s) of {what}: {_why(report)}; {fix}")


def check_download(report: StepReport) -> None:
    """Raises when a (whole, unsharded) download kept no image."""
    check_rows(
        report,
        "the sources",
        "check that the source holds images of a supported format and that each has a label its layout gives "
        "(docs/sources.md), or name the label part (label_key) or column (label_column)",
    )


def check_clean(
    report: StepReport,
    *,
    min_images_per_class: int,
    min_images_per_split: int,
    fractions: Sequence[float],
    min_classes: int = 2,
) -> None:
    """Raises when clean kept nothing, images of fewer than ``min_classes`` classes, a class under its minimum, or a split too few.

    Args:
        report: The committed clean report (``extra`` has ``per_class`` and ``splits``).
        min_images_per_class: Fewest kept images a class may have; 0 turns the check off.
        min_images_per_split: Fewest images a split whose fraction is above 0 may have; 0 turns it off.
        fractions: The train/val/test fractions the config asked for.
        min_classes: Fewest classes with a kept image (a classifier needs two; 1 accepts one).
    """
    check_rows(report, "the download", "see the reasons above; label_source and the source's layout decide which images have a class")
    per_class: Mapping[str, int] = report.extra.get("per_class") or {}
    classes = report.extra.get("classes") or list(per_class)
    found = sorted((name for name in classes if per_class.get(name, 0) > 0), key=lambda name: -per_class[name])
    if len(found) < min_classes:
        shown = ", ".join(f"{name!r} {per_class[name]}" for name in found[:8])
        raise DegenerateOutput(
            f"clean kept images of {len(found)} class(es) ({shown}), fewer than min_classes={min_classes}: a classifier needs "
            "images of two classes at least; check label_source and the source's layout (the class of each image), add images of "
            f"other classes, or set min_classes=1 to accept a one-class set (train still refuses it). {_why(report)}"
        )
    thin = {name: per_class.get(name, 0) for name in classes if per_class.get(name, 0) < min_images_per_class}
    if thin:
        shown = ", ".join(f"{name!r} {n}" for name, n in sorted(thin.items(), key=lambda kv: kv[1])[:8])
        more = f" and {len(thin) - 8} more" if len(thin) > 8 else ""
        raise DegenerateOutput(
            f"clean left {len(thin)} of {len(classes)} class(es) with fewer than min_images_per_class={min_images_per_class} "
            f"image(s): {shown}{more}; add images of those classes, drop them from the source, or lower min_images_per_class "
            f"(0 turns the check off). {_why(report)}"
        )
    # Clean's report names every split, in the order its fractions are given (clean.config.SPLITS).
    splits: Mapping[str, int] = report.extra.get("splits") or {}
    short = [name for name, fraction in zip(splits, fractions) if fraction > 0 and splits[name] < min_images_per_split]
    if short and min_images_per_split > 0:
        counts = ", ".join(f"{name} {n}" for name, n in splits.items())
        raise DegenerateOutput(
            f"clean's {'/'.join(short)} split has fewer than min_images_per_split={min_images_per_split} image(s) "
            f"({counts} of {report.outputs} kept, split {tuple(fractions)} per class): use more images per class, raise the "
            f"fraction of {'/'.join(short)} in split, or set min_images_per_split=0 to accept it"
        )
