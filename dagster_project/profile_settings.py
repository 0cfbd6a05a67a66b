"""One typed model of a whole profile file: every section, every key, every number's range.

The sections are built from the resource classes' own fields (so a field added to a resource is a
setting at once, with the bounds the class declares), each with `extra="forbid"`. A wrong profile
is refused when the Definitions load, with one line per problem that names the file, the setting,
the nearest valid key or the valid range, and the environment variable a bad value came from.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
import dagster as dg
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    WrapValidator,
    create_model,
)
from pydantic.fields import FieldInfo

from dagster_project.automation import AutomationSettings
from unicorn_assets.instructions import InstructionDefaults
from unicorn_resources.clip import OpenClipResource
from unicorn_resources.diffusion import SdxlResource
from unicorn_resources.llm import FakeLLM, LlamaCppLLM, OpenAILLM, TransformersLLM, VllmLLM
from unicorn_resources.llm2clip import Llm2ClipResource
from unicorn_resources.quality_gates import QualityGates
from unicorn_resources.seed_source import SeedSource
from unicorn_resources.storage import ParquetIOManager

LLM_BACKENDS: dict[str, type[dg.ConfigurableResource]] = {
    "llama_cpp": LlamaCppLLM,
    "transformers": TransformersLLM,
    "vllm": VllmLLM,
    "openai": OpenAILLM,
    "fake": FakeLLM,
}
CLIP_BACKENDS: dict[str, type[dg.ConfigurableResource]] = {"open_clip": OpenClipResource,
                                                           "llm2clip": Llm2ClipResource}
DIFFUSION_BACKENDS: dict[str, type[dg.ConfigurableResource]] = {"sdxl": SdxlResource}
DEFAULT_BACKEND = {"llm": "llama_cpp", "clip": "open_clip", "diffusion": "sdxl"}


BACKENDS = {"llm": LLM_BACKENDS, "clip": CLIP_BACKENDS, "diffusion": DIFFUSION_BACKENDS}


def without_other_backends_settings(spec: dict[str, Any], sources: Mapping[str, str]
                                    ) -> dict[str, Any]:
    """`spec` without the settings that the file wrote for another backend, in each section whose
    `backend` the environment chose (UNICORN_LLM_BACKEND=fake over a llama_cpp profile: its
    `model_path` and `n_ctx` are for llama_cpp, not misspellings). A key that no backend of the
    section has is kept, so it is still refused with the nearest valid key."""
    out = dict(spec)
    for section, backends in BACKENDS.items():
        values = out.get(section)
        chosen = values.get("backend") if isinstance(values, dict) else None
        if f"{section}.backend" not in sources or chosen not in backends:
            continue
        own = set(backends[chosen].model_fields) | {"backend"}
        others = set().union(*(cls.model_fields for cls in backends.values()))
        out[section] = {k: v for k, v in values.items() if k in own or k not in others}
    return out


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file, the setting and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


def _run_time_env(value: Any, handler: Any) -> Any:
    """`{env: NAME}` without a default is an EnvVar that Dagster reads in the run: it passes here,
    and the resource checks its value when the run builds it."""
    return value if isinstance(value, dg.EnvVar) else handler(value)


def _null_is_empty(value: Any, handler: Any) -> Any:
    """A section or sub-section left empty in YAML (`s3:`) is null: its defaults."""
    if value is not None and not isinstance(value, Mapping | BaseModel):
        raise ValueError("a section is a mapping of settings (name: value), not "
                         f"{type(value).__name__}")
    return handler({} if value is None else value)


# Settings a profile may set to null, meaning "the loader's default": the response cache beside the
# data (llm.cache_path), the bundled seeds (seeds.location).
NULL_IS_DEFAULT = ("cache_path", "location")


@cache
def settings_model(cls: type[BaseModel], name: str | None = None,
                   backend: str | None = None,
                   defaults: tuple[tuple[str, Any], ...] = ()) -> type[BaseModel]:
    """A strict pydantic model of `cls`'s fields (a Dagster resource or Config): the same types,
    defaults and bounds, no other key; a nested Config becomes a strict model too. With `backend`,
    a `backend: <that name>` key is part of it. `defaults` ((name, value) pairs) gives fields a profile default that
    the class itself cannot know (the bundled seeds belong to this package)."""
    fields: dict[str, Any] = {}
    if backend is not None:
        fields["backend"] = (Literal[backend], backend)
    for field_name, info in cls.model_fields.items():
        annotation = info.annotation
        if field_name in NULL_IS_DEFAULT:
            annotation = annotation | None
        checks: list[Any] = [*info.metadata, WrapValidator(_run_time_env)]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = settings_model(annotation)
            checks.append(WrapValidator(_null_is_empty))
        default = (dict(defaults)[field_name] if field_name in dict(defaults)
                   else ... if info.is_required() else info.get_default(call_default_factory=True))
        fields[field_name] = (Annotated[(annotation, *checks)],
                              Field(default, description=info.description))
    return create_model(name or f"{cls.__name__}Settings", __base__=_Strict, **fields)


def _backend_union(section: str, backends: dict[str, type[dg.ConfigurableResource]]) -> Any:
    """The settings of `section`: the fields of the backend its `backend` key names (default
    DEFAULT_BACKEND[section]), and no others."""
    def which(value: Any) -> Any:
        if isinstance(value, Mapping):
            backend = value.get("backend", DEFAULT_BACKEND[section])
        else:
            backend = getattr(value, "backend", None)
        return backend if isinstance(backend, str) and not isinstance(backend, dg.EnvVar) else None

    variants = tuple(Annotated[settings_model(cls, f"{section}:{tag}", tag), Tag(tag)]
                     for tag, cls in backends.items())
    return Annotated[Union[variants], Discriminator(which),  # noqa: UP007
                     WrapValidator(_null_is_empty)]


def _section(model: Any) -> Any:
    return Annotated[model, WrapValidator(_null_is_empty)]


class SynthvlmSettings(_Strict):
    enabled: bool = False  # the SynthVLM assets and jobs are part of the Definitions


class OpRunConfig(_Strict):
    config: dict[str, Any] = {}


class JobRunConfig(_Strict):
    """A job's default run config (`run_config.<job>`); Dagster checks each op's config."""
    ops: dict[str, _section(OpRunConfig)] = {}


class ProfileSettings(_Strict):
    """Every section a profile file may have; a section left out takes the resource's defaults."""

    name: str | None = None
    storage: _section(settings_model(ParquetIOManager, "storage")) = Field(
        default_factory=dict, validate_default=True)
    seeds: _section(settings_model(SeedSource, "seeds", defaults=(("location", "bundled"),))) = Field(
        default_factory=dict, validate_default=True)
    llm: _backend_union("llm", LLM_BACKENDS) = Field(default_factory=dict, validate_default=True)
    clip: _backend_union("clip", CLIP_BACKENDS) = Field(default_factory=dict,
                                                        validate_default=True)
    diffusion: _backend_union("diffusion", DIFFUSION_BACKENDS) = Field(
        default_factory=dict, validate_default=True)
    quality_gates: _section(settings_model(QualityGates, "quality_gates")) = Field(
        default_factory=dict, validate_default=True)
    stage2: _section(settings_model(InstructionDefaults, "stage2")) = Field(
        default_factory=dict, validate_default=True)
    synthvlm: _section(SynthvlmSettings) = SynthvlmSettings()
    automation: _section(AutomationSettings) = AutomationSettings()
    run_config: _section(dict[str, _section(JobRunConfig)]) = {}
    # Kubernetes values documented for the Helm chart; the loader does not read them.
    k8s: _section(dict[str, Any]) = {}


def set_values(value: Any) -> Any:
    """A validated model as plain dicts of the values the profile set (coerced: "true" is True),
    without the defaults it left out; EnvVars stay EnvVars."""
    if isinstance(value, BaseModel):
        return {name: set_values(getattr(value, name)) for name in value.model_fields_set}
    if isinstance(value, dict):
        return {key: set_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [set_values(item) for item in value]
    return value


# --- error messages ---------------------------------------------------------------------------------

def _strip(annotation: Any) -> tuple[Any, list[Any]]:
    """(the type inside Annotated/Optional, the metadata found on the way)."""
    metadata: list[Any] = []
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *more = get_args(annotation)
            metadata.extend(more)
        elif get_origin(annotation) in (Union, type(int | None)) and type(None) in get_args(
                annotation) and len(get_args(annotation)) == 2:
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            return annotation, metadata


def _tags(annotation: Any, metadata: list[Any] = ()) -> dict[str, Any]:
    """{tag: variant model} of a tagged union (of one variant: the Tag is in `metadata`)."""
    out = {item.tag: _strip(annotation)[0] for item in metadata if isinstance(item, Tag)}
    variants = get_args(annotation) if get_origin(annotation) is Union else (annotation,)
    for variant in variants:
        model, found = _strip(variant)
        out.update({item.tag: model for item in found if isinstance(item, Tag)})
    return out


class _Place:
    """Where an error's location points in the profile model."""

    def __init__(self, loc: tuple[Any, ...]):
        self.keys: list[str] = []  # the location as the profile spells it (tags dropped)
        self.parent: type[BaseModel] | None = None  # the model the last key belongs to
        self.field: FieldInfo | None = None
        self.metadata: list[Any] = []
        self.annotation: Any = ProfileSettings
        self.backend: str | None = None  # the backend variant the location is in
        annotation: Any = ProfileSettings
        for part in loc:
            tags = _tags(annotation, self.metadata)
            annotation, _ = _strip(annotation)
            if tags and part in tags:
                annotation, self.backend = tags[part], str(part)
                continue
            self.keys.append(str(part))
            self.field, self.metadata = None, []
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                self.parent = annotation
                self.field = annotation.model_fields.get(str(part))
                if self.field is None:
                    annotation = None
                else:
                    annotation = self.field.annotation
                    self.metadata = list(self.field.metadata)
            elif get_origin(annotation) is dict:
                self.parent, annotation = None, get_args(annotation)[1]
            elif get_origin(annotation) is list:
                self.parent, annotation = None, get_args(annotation)[0]
            else:
                self.parent, annotation = None, None
        self.annotation = annotation

    @property
    def dotted(self) -> str:
        return ".".join(self.keys)

    def bounds(self) -> list[Any]:
        _, inner = _strip(self.annotation)
        return [*self.metadata, *inner]


def _range(metadata: list[Any]) -> str:
    low = high = None
    step = ""
    for item in metadata:
        if isinstance(item, at.Ge):
            low = ("ge", item.ge)
        elif isinstance(item, at.Gt):
            low = ("gt", item.gt)
        elif isinstance(item, at.Le):
            high = ("le", item.le)
        elif isinstance(item, at.Lt):
            high = ("lt", item.lt)
        elif isinstance(item, at.MultipleOf):
            step = f", a multiple of {item.multiple_of}"
    if low and high and low[0] == "ge" and high[0] == "le":
        return f"between {low[1]} and {high[1]}{step}"
    words = {"ge": "at least", "gt": "more than", "le": "at most", "lt": "less than"}
    parts = [f"{words[kind]} {value}" for kind, value in (b for b in (low, high) if b)]
    return " and ".join(parts) + step


def _default(place: _Place) -> str:
    if place.field is None or place.field.is_required():
        return ""
    default = place.field.get_default(call_default_factory=True)
    if isinstance(default, (BaseModel, dict, list)):
        return ", or remove it to take the defaults"
    return f", or remove it to take the default {default!r}"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _near(word: str, options: list[str]) -> str | None:
    found = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return found[0] if found else None


def _problem(error: Mapping[str, Any], prefix: tuple[Any, ...], env: Mapping[str, str]) -> str:
    loc = (*prefix, *error["loc"])
    place = _Place(loc)
    kind, value = error["type"], error.get("input")
    source = env.get(place.dotted)
    shown = f"{place.dotted} = {_short(value)}" + (f" (from environment variable {source})"
                                                    if source else "")
    fix = f"; fix or unset {source}" if source else ""

    if kind == "extra_forbidden":
        key = place.keys[-1]
        valid = sorted(place.parent.model_fields) if place.parent else []
        section = ".".join(place.keys[:-1])
        where = f"{section}." if section else ""
        near = _near(key, valid)
        hint = f"did you mean {where}{near}?" if near else \
            f"remove it, or use a setting of {section or 'a profile'}"
        return f"{place.dotted} is not a setting; {hint} (valid: {', '.join(valid)})"
    if kind == "union_tag_invalid":
        tags = sorted(_tags(place.annotation, place.metadata))
        tag = error.get("ctx", {}).get("tag")
        source = env.get(f"{place.dotted}.backend")
        origin = f" (from environment variable {source})" if source else ""
        near = _near(str(tag), tags)
        hint = f"did you mean {near!r}? (valid: " if near else "use one of ("
        return (f"{place.dotted}.backend = {tag!r}{origin} is not a backend; {hint}"
                f"{', '.join(tags)})" + (f"; fix or unset {source}" if source else ""))
    if kind == "union_tag_not_found":
        return (f"{place.dotted}.backend must be known when the profile loads: write it out, or "
                "give its {env: NAME} a default")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal",
                "multiple_of"):
        return f"{shown} is out of range: must be {_range(place.bounds())}{fix}"
    if kind in ("too_short", "too_long"):
        return f"{shown} is not valid: {error['msg']}{fix}"
    if kind == "missing":
        needs = f"backend {place.backend}" if place.backend else ".".join(place.keys[:-1])
        return f"{place.dotted} is missing: {needs or 'a profile'} needs it; set it"
    if kind == "literal_error":
        options = [str(o) for o in get_args(_strip(place.annotation)[0])]
        near = _near(str(value), options)
        hint = f"; did you mean {near!r}?" if near else ""
        return f"{shown} is not one of {', '.join(map(repr, options))}{hint}{fix}"
    if kind == "value_error" and not error["loc"]:
        # a check across settings (a model validator of the resource): its own message
        message = str(error.get("ctx", {}).get("error", error["msg"]))
        return f"{place.dotted}: {message}"
    message = str(error.get("ctx", {}).get("error", error["msg"]))
    return f"{shown} is not valid: {message}{fix or '; fix it'}{_default(place) if not source else ''}"


def describe(err: ValidationError, path: str, env: Mapping[str, str] | None = None,
             prefix: tuple[Any, ...] = ()) -> str:
    """One line per problem: `<file>: <setting> ...: <the fix>`."""
    return "\n".join(f"{path}: {_problem(e, prefix, env or {})}" for e in err.errors())


def validate_profile(spec: Mapping[str, Any], path: str = "the profile",
                     env: Mapping[str, str] | None = None) -> ProfileSettings:
    """The profile as ProfileSettings, or ProfileError naming every problem. `env` maps a setting
    (dotted) to the environment variable its value came from."""
    if not isinstance(spec, Mapping):
        raise ProfileError(f"{path}: a profile is a mapping of sections (storage:, llm:, ...), "
                           f"not {type(spec).__name__}")
    try:
        return ProfileSettings.model_validate(
            {k: v for k, v in spec.items() if not str(k).startswith("_")})
    except ValidationError as err:
        raise ProfileError(describe(err, path, env)) from None


def build_checked(cls: type[Any], values: Mapping[str, Any], at: tuple[str, ...],
                  path: str = "the profile") -> Any:
    """cls(**values); a check of the class across its settings (a model validator) names the
    section `at` (with the backend tag, e.g. ("llm", "openai")) and the file."""
    try:
        return cls(**values)
    except ValidationError as err:
        raise ProfileError(describe(err, path, prefix=at)) from None
