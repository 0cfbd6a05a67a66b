"""Versioned prompt templates, loaded from files under unicorn_assets/prompts/."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from string import Template

import yaml

PROMPTS = files("unicorn_assets") / "prompts"


@dataclass(frozen=True)
class PromptSet:
    name: str
    version: str
    system: str
    user: str
    styles: dict[str, str]
    digest: str

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    def messages(self, style: str = "", **values: object) -> list[dict[str, str]]:
        # rstrip: a template that ends with $focus has no trailing blank without a style focus
        user = Template(self.user).safe_substitute(focus=self.styles.get(style, ""),
                                                    **values).rstrip()
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


@cache
def load_prompt_set(name: str, version: str) -> PromptSet:
    path = PROMPTS / name / f"{version}.yaml"
    if not path.is_file():
        known = sorted(p.name for p in (PROMPTS / name).iterdir()) if (PROMPTS / name).is_dir() else []
        raise FileNotFoundError(
            f"no prompt template {name}/{version}.yaml under {PROMPTS}; known versions: "
            f"{', '.join(known) or 'none'}"
        )
    text = path.read_text(encoding="utf-8")
    spec = yaml.safe_load(text)
    return PromptSet(
        name=spec["name"], version=spec["version"], system=spec["system"].strip(),
        user=spec["user"].strip(), styles=dict(spec.get("styles") or {}),
        digest=hashlib.sha1(text.encode()).hexdigest()[:12],
    )


@cache
def load_lines(relative: str) -> tuple[str, ...]:
    """Non-comment, non-blank lines of a versioned list file (templates, patterns)."""
    text = (PROMPTS / relative).read_text(encoding="utf-8")
    return tuple(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )
