"""The hazard categories a guard classifies into: the MLCommons taxonomy as Llama Guard 3/4 number it (S1-S14),
plus caller-defined categories and exclusions.

A category set is an ordered list of `Category(code, name, description)`. Llama Guard prompts list them as
"S1: Violent Crimes." lines; custom sets get codes S1..Sn in the order given (Meta's convention for custom
taxonomies), and excluded codes are left out of the prompt and ignored in the answer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from ..errors import InvalidRequestError


@dataclass(frozen=True)
class Category:
    """One hazard category: `code` as the guard writes it ("S2"), a short `name`, an optional longer policy."""

    code: str
    name: str
    description: str = ""


# Names as Llama Guard 3's chat template lists them (S14 is in the 8B model's policy, not the 1B's).
LLAMA_GUARD_3 = (
    Category("S1", "Violent Crimes"),
    Category("S2", "Non-Violent Crimes"),
    Category("S3", "Sex Crimes"),
    Category("S4", "Child Exploitation"),
    Category("S5", "Defamation"),
    Category("S6", "Specialized Advice"),
    Category("S7", "Privacy"),
    Category("S8", "Intellectual Property"),
    Category("S9", "Indiscriminate Weapons"),
    Category("S10", "Hate"),
    Category("S11", "Self-Harm"),
    Category("S12", "Sexual Content"),
    Category("S13", "Elections"),
    Category("S14", "Code Interpreter Abuse"),
)

# Llama Guard 4 and the MLCommons hazard names in Meta's model cards.
MLCOMMONS = (
    Category("S1", "Violent Crimes"),
    Category("S2", "Non-Violent Crimes"),
    Category("S3", "Sex-Related Crimes"),
    Category("S4", "Child Sexual Exploitation"),
    Category("S5", "Defamation"),
    Category("S6", "Specialized Advice"),
    Category("S7", "Privacy"),
    Category("S8", "Intellectual Property"),
    Category("S9", "Indiscriminate Weapons"),
    Category("S10", "Hate"),
    Category("S11", "Suicide & Self-Harm"),
    Category("S12", "Sexual Content"),
    Category("S13", "Elections"),
    Category("S14", "Code Interpreter Abuse"),
)

CODE_RE = re.compile(r"S([1-9][0-9]?)")


def category_name(code: str) -> str:
    """The MLCommons name of a standard code ("S10" -> "Hate"); the code itself when it is not standard."""
    for c in MLCOMMONS:
        if c.code == code:
            return c.name
    return code


def check_codes(codes: Iterable[str], known: Sequence[Category], what: str) -> list[str]:
    """Validate category codes against `known`; returns them in the taxonomy's order."""
    if isinstance(codes, str):
        codes = [c for c in re.split(r"[,\s]+", codes) if c]
    codes = list(codes)
    valid = {c.code for c in known}
    for c in codes:
        if not isinstance(c, str) or c not in valid:
            raise InvalidRequestError(f"unknown category {c!r} in {what}; expected codes like "
                                      f"{', '.join(sorted(valid, key=_order))}", field=what)
    return [c.code for c in known if c.code in codes]


def _order(code: str) -> int:
    m = CODE_RE.fullmatch(code)
    return int(m.group(1)) if m else 999


def custom_categories(spec) -> tuple[Category, ...]:
    """Categories from a caller: a mapping {"S1": "name" or {"name", "description"}} or a list of names /
    {"name", "description"} objects (numbered S1..Sn in order)."""
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        items = [(f"S{i + 1}", v) for i, v in enumerate(spec)]
    else:
        raise InvalidRequestError("categories must be a mapping of codes to names or a list of names",
                                  field="categories")
    if not items:
        raise InvalidRequestError("categories must not be empty", field="categories")
    if len(items) > 99:
        raise InvalidRequestError("at most 99 categories", field="categories")
    out = []
    for code, v in items:
        if not isinstance(code, str) or not CODE_RE.fullmatch(code):
            raise InvalidRequestError(f"category code {code!r} must look like S1..S99", field="categories")
        if isinstance(v, str):
            name, desc = v, ""
        elif isinstance(v, Mapping) and isinstance(v.get("name"), str):
            name, desc = v["name"], v.get("description") or ""
            if not isinstance(desc, str):
                raise InvalidRequestError(f"category {code} description must be a string", field="categories")
        else:
            raise InvalidRequestError(f"category {code} needs a name", field="categories")
        name = name.strip().rstrip(".")
        if not name or "\n" in name or len(name) > 200:
            raise InvalidRequestError(f"category {code} name must be one line of 1-200 characters",
                                      field="categories")
        if len(desc) > 4000:
            raise InvalidRequestError(f"category {code} description is longer than 4000 characters",
                                      field="categories")
        out.append(Category(code, name, desc.strip()))
    if len({c.code for c in out}) != len(out):
        raise InvalidRequestError("duplicate category codes", field="categories")
    return tuple(out)
