"""The config key table of docs/TRAINING.md (the README points there) names every key a stage config has."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from cdm.config import DERIVED_UNET_FIELDS, StageConfig

README = Path(__file__).resolve().parents[1] / "docs" / "TRAINING.md"


def readme_key_table() -> dict[str, set[str]]:
    """``{section: names in backticks}`` of the table under "| section | what it sets |" ("" is the
    top level); a row may name its key beside the section (``| `[train]` `crop` | ... |``)."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\|\s*section\s*\|\s*what it sets", line))
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        section, keys = [c.strip() for c in line.strip("|").split("|")][:2]
        m = re.match(r"`\[(\w+)\]`", section)
        name = m.group(1) if m else ""
        extra = section[m.end():] if m else ""
        table.setdefault(name, set()).update(re.findall(r"`([^`]+)`", extra + keys))
    return table


def config_keys() -> dict[str, list[str]]:
    """``{section: its fields}`` of :class:`StageConfig` ("" the top level), less the derived U-Net fields."""
    out: dict[str, list[str]] = {"": []}
    for name, tp in typing.get_type_hints(StageConfig).items():
        if dataclasses.is_dataclass(tp):
            derived = DERIVED_UNET_FIELDS if name == "unet" else ()
            out[name] = [f.name for f in dataclasses.fields(tp) if f.name not in derived]
        else:
            out[""].append(name)
    return out


def test_the_readme_key_table_lists_every_config_key():
    table, keys = readme_key_table(), config_keys()
    assert set(keys) == {"", "data", "unet", "diffusion", "augment", "train"}, keys
    missing = [f"{s}.{k}" if s else k for s, names in keys.items() for k in names if k not in table.get(s, set())]
    assert not missing, f"add {', '.join(missing)} to docs/TRAINING.md's config key table (section 'Train a stage')"
