"""A local run's settings in layers: the defaults in code, then each ``--config`` file, then the command line.

    layers = Layers()
    layers.add_file("configs/local.yaml")                 # sections pipeline, synth and one per step
    layers.add_command_line(["epochs=1"], ["train.lr=0.001"])   # --param, --set
    layers.params, layers.sections, layers.synth

A later layer wins field by field. A typed pipeline parameter and the step config field it sets
(``epochs`` and ``train.epochs``, ``image_size`` and ``resize.size``) are one setting: whichever
layer names it last decides it, so ``--param epochs=1`` beats a config file's ``train: {epochs: 3}``.
Within one file the step section wins over its ``pipeline`` section (it is more specific).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgpipe.config import SECTIONS, check_sections, did_you_mean, parse_override, read_config_file
from imgpipe.kfp.preflight import parameter_fields
from imgpipe.step_table import STEPS

__all__ = ["SYNTH_KEYS", "Layers"]

# The synth section's keys: the SynthConfig fields a local run passes on.
SYNTH_KEYS = ("classes", "per_class", "seed", "off_centre")


@dataclass
class Layers:
    """The settings so far: pipeline parameters, step sections and synth keys, each layer over the ones before.

    Attributes:
        params: Pipeline parameters (``epochs``, ``image_size``, ...).
        sections: Step name -> its config fields (what the pipeline's ``step_config`` takes).
        synth: The sample data set's keys (:data:`SYNTH_KEYS`).
    """

    params: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    synth: dict[str, Any] = field(default_factory=dict)

    def add(
        self,
        params: Mapping[str, Any] | None = None,
        sections: Mapping[str, Mapping[str, Any]] | None = None,
        synth: Mapping[str, Any] | None = None,
    ) -> None:
        """Lays one layer over the ones before: its parameters first, then its sections (more specific).

        Raises:
            ValueError: On an unknown synth key, or a ``step_config`` parameter that is not step sections.
        """
        fields = parameter_fields()
        for name, value in (params or {}).items():
            if name == "step_config":  # the parameter that holds sections: a layer of sections
                self.add(sections=_sections_of(value, "--param step_config"))
                continue
            self.params[name] = value
            if name in fields:
                step, key = fields[name]
                self.sections.get(step, {}).pop(key, None)
        for step, values in (sections or {}).items():
            for key, value in values.items():
                self.sections.setdefault(step, {})[key] = value
                for name in [p for p, at in fields.items() if at == (step, key)]:
                    self.params.pop(name, None)
        unknown = sorted(set(synth or {}) - set(SYNTH_KEYS))
        if unknown:
            shown = ", ".join(u + did_you_mean(u, SYNTH_KEYS) for u in unknown)
            raise ValueError(f"synth section: unknown key(s) {shown}; keys: {', '.join(SYNTH_KEYS)}")
        self.synth.update(synth or {})

    def add_file(self, path: str | Path) -> None:
        """Lays a config file over the settings: sections ``pipeline``, ``synth`` and one per step.

        Raises:
            ValueError: On a missing file, an unknown section or synth key, or a section that is not a mapping.
        """
        loaded = read_config_file(path)
        check_sections(loaded, f"config file {path}")
        for section, values in loaded.items():
            if not isinstance(values, Mapping):
                raise ValueError(f"config file {path}: section {section!r} must hold a mapping of options")
        self.add(loaded.get("pipeline") or {}, {s: loaded[s] for s in STEPS if loaded.get(s)}, loaded.get("synth") or {})

    def add_command_line(self, params: Iterable[str] = (), sets: Iterable[str] = ()) -> None:
        """Lays ``--param KEY=VALUE`` and ``--set SECTION.KEY=VALUE`` over the settings (the last layer).

        Raises:
            ValueError: On a malformed pair or an unknown section.
        """
        self.add(dict(parse_override(p) for p in params))
        layer: dict[str, dict[str, Any]] = {}
        for text in sets:
            key, value = parse_override(text)
            section, dot, name = key.partition(".")
            if not dot or not name:
                raise ValueError(f"--set {text!r}: imgpipe run takes SECTION.KEY=VALUE, e.g. --set train.lr=0.001 (sections: {', '.join(SECTIONS)})")
            check_sections({section: None}, f"--set {text}")
            layer.setdefault(section, {})[name] = value
        pipeline, synth = layer.pop("pipeline", {}), layer.pop("synth", {})
        self.add(pipeline, layer, synth)


def _sections_of(value: Any, where: str) -> dict[str, dict[str, Any]]:
    """A ``step_config`` value: a mapping of step names to mappings of fields."""
    if not isinstance(value, Mapping):
        raise ValueError(f'{where}: expected a mapping of step sections, e.g. {{"train": {{"lr": 0.001}}}}, got {value!r}')
    check_sections(value, where, tuple(STEPS))
    for step, values in value.items():
        if not isinstance(values, Mapping):
            raise ValueError(f"{where}: section {step!r} must hold a mapping of options, got {values!r}")
    return {step: dict(values) for step, values in value.items()}
