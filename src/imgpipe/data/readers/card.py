"""A Hugging Face dataset card (the Hub's ``README.md``): its YAML front matter, read within a budget, and the class names in it.

    names = card_class_names(readme_text, "file:///d/beans/README.md")   # {"labels": ("angular_leaf_spot", ...)}

The card is data from whoever published the dataset. Its front matter is parsed only after
its events were counted (:func:`load_front_matter`): at most :data:`MAX_NODES` nodes, an
alias counting as every node it stands for, at most :data:`MAX_ALIASES` aliases, none inside
the node it names. A few hundred bytes of aliases would otherwise expand into millions of
names. Every ``class_label`` list passes the label gate
(:func:`imgpipe.data.labelgate.check_class_list`); a card that breaks a rule refuses the
source in one line naming the file and the rule.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from imgpipe.data.labelgate import MAX_CLASSES, check_class_list, describe

__all__ = ["OverBudget", "MAX_CARD_BYTES", "MAX_NODES", "MAX_ALIASES", "MAX_DEPTH", "load_front_matter", "card_class_names"]

# The most of a README read for its front matter: the Hub's cards keep it at the top.
MAX_CARD_BYTES = 4 << 20
# Nodes of the front matter (scalars, lists, mappings; an alias as the nodes it names): room
# for MAX_CLASSES names as a mapping of index to name, and the rest of a card.
MAX_NODES = 4 * MAX_CLASSES
MAX_ALIASES = 64
# Lists and mappings inside each other: datasets writes a handful of levels.
MAX_DEPTH = 64
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.S)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STARTS = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_ENDS = (yaml.SequenceEndEvent, yaml.MappingEndEvent)


class OverBudget(ValueError):
    """A front matter past the node, alias or depth budget (or with an alias it cannot have)."""


def _count(text: str, where: str) -> None:
    """Refuses a front matter past the node or alias budget, from its parse events (nothing is built)."""
    nodes = aliases = 0
    sizes: dict[str, int | None] = {}  # anchor -> nodes it names; None while it is still open
    open_nodes: list[tuple[str | None, int]] = []
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise OverBudget(f"{where}: the YAML front matter has more than {MAX_ALIASES} aliases")
            size = sizes.get(event.anchor)
            if size is None:
                raise OverBudget(f"{where}: the YAML front matter has an alias inside the node it names, or to no anchor")
            nodes += size
        elif isinstance(event, (yaml.ScalarEvent, *_STARTS)):
            if event.anchor is not None:
                if event.anchor in sizes:
                    raise OverBudget(f"{where}: the YAML front matter defines an anchor twice")
                sizes[event.anchor] = None
            if isinstance(event, yaml.ScalarEvent):
                if event.anchor is not None:
                    sizes[event.anchor] = 1
            else:
                open_nodes.append((event.anchor, nodes))
                if len(open_nodes) > MAX_DEPTH:
                    raise OverBudget(f"{where}: the YAML front matter nests more than {MAX_DEPTH} levels deep")
            nodes += 1
        elif isinstance(event, _ENDS):
            anchor, start = open_nodes.pop()
            if anchor is not None:
                sizes[anchor] = nodes - start
        if nodes > MAX_NODES:
            raise OverBudget(f"{where}: the YAML front matter expands to more than {MAX_NODES} nodes (aliases counted as what they stand for)")


def load_front_matter(readme: str, where: str) -> Any:
    """The card's YAML front matter as plain data (``None`` when it has none).

    Raises:
        ValueError: Naming ``where``, when the front matter is not YAML or is past the budget.
    """
    match = _FRONT_MATTER.match(readme.lstrip("\ufeff"))
    if match is None:
        return None
    text = match.group(1)
    try:
        _count(text, where)
        return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader (CSafeLoader or SafeLoader)
    except OverBudget:
        raise
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a date or an integer no constructor takes
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 2}" if mark is not None else ""  # + the opening --- line, 1-based
        raise ValueError(f"{where}: the YAML front matter cannot be read as plain YAML data{at}; fix the card or remove its front matter") from None


def card_class_names(readme: str, where: str) -> dict[str, tuple[str, ...]]:
    """Each ``class_label`` column's names in a dataset card's YAML front matter.

    ``push_to_hub`` writes ``dataset_info: features: - name: label dtype: class_label: names:
    {'0': cat, '1': dog}`` (``datasets.info.DatasetInfo._to_yaml_dict``); a card with several
    configs has a list of ``dataset_info`` entries, of which the first (or ``default``) counts.
    Parts of the card that are not where ``datasets`` writes features are ignored; a
    ``class_label``'s names that are anything but class names, by index, refuse the card.

    Raises:
        ValueError: One line naming ``where`` and the rule (:func:`load_front_matter`,
            :func:`imgpipe.data.labelgate.check_class_list`).
    """
    meta = load_front_matter(readme, where)
    info = meta.get("dataset_info") if isinstance(meta, dict) else None
    if isinstance(info, list):
        info = next((i for i in info if isinstance(i, dict) and i.get("config_name") == "default"), info[0] if info else None)
    features = info.get("features") if isinstance(info, dict) else None
    out: dict[str, tuple[str, ...]] = {}
    for i, feature in enumerate(features if isinstance(features, list) else []):
        dtype = feature.get("dtype") if isinstance(feature, dict) else None
        label = dtype.get("class_label") if isinstance(dtype, dict) else None
        if not isinstance(label, dict) or "names" not in label:
            continue
        column = feature.get("name")
        place = f"{where}: dataset_info features[{i}] class_label names"
        if not isinstance(column, str):
            raise ValueError(f"{place}: the feature's name is {describe(column)}, not a column name")
        if column in out:
            raise ValueError(f"{place}: column {column!r} has class_label names twice")
        out[column] = check_class_list(_by_index(label["names"], place), f"{place} of column {column!r}")
    return out


def _by_index(names: Any, place: str) -> Any:
    """A ``{'0': cat, '1': dog}`` mapping as the list it stands for; anything else as it is (the gate judges it)."""
    if not isinstance(names, dict):
        return names
    keys: dict[int, Any] = {}
    for key, name in names.items():
        text = str(key) if isinstance(key, int) and not isinstance(key, bool) else key
        if not (isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= len(str(MAX_CLASSES)) and text == str(int(text))):
            raise ValueError(f"{place}: a key of the names mapping is not a class index (0, 1, ...)")
        if int(text) in keys:
            raise ValueError(f"{place}: the names mapping gives class {int(text)} twice")
        keys[int(text)] = name
    if sorted(keys) != list(range(len(keys))):
        raise ValueError(f"{place}: the names mapping's keys are not 0..{len(keys) - 1}, so its names have no class index each")
    return [keys[k] for k in range(len(keys))]
