"""Load a job YAML file, apply ``a.b=value`` overrides, validate, and report errors by file:line:field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rayapp.errors import UserError
from rayapp.fileio import write_text_atomic
from rayapp.kinds import KINDS, config_class

RESOLVED_CONFIG = "config.resolved.yaml"  # every job leaves its resolved config beside its outputs

class ConfigError(UserError, ValueError):
    """A job file that cannot be used, with every problem as ``file:line: field: reason``."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _line_index(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {prefix: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            lines.update(_line_index(value_node, path))
            lines[path] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_index(item, prefix + (i,)))
    return lines


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.epochs=2`` -> (["train", "epochs"], 2). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError([f"override '{text}': expected KEY=VALUE, e.g. train.epochs=2"])
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override '{text}': empty key segment in '{key}'"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError([f"override '{text}': value is not valid YAML ({e.problem})"]) from e
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError([f"override '{text}': '{where}' is a {type(child).__name__}, not a section"])
            node = child
        node[path[-1]] = value
    return data


def _format_errors(err: ValidationError, source: str, lines: dict[tuple, int], overridden: set[str]) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        # The nearest enclosing key that has a line in the file.
        line = None
        for n in range(len(loc), -1, -1):
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (misspelt? see `rayapp validate --explain KIND` for the fields)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        where = f"{source}:{line}" if line else source
        if field in overridden:
            where = f"{source} (override {field})"
        problems.append(f"{where}: {field}: {msg}" if loc else f"{where}: {msg}")
    return problems


def load_job_dict(data: dict, source: str = "<dict>", lines: dict | None = None, overridden: set[str] | None = None):
    """Validate an already-parsed job mapping into its typed config."""
    lines = lines or {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}:1: the job file must be a mapping with a `kind:` key"])
    kind = data.get("kind")
    if kind is None:
        raise ConfigError([f"{source}:1: kind: required field is missing (one of: {', '.join(KINDS)})"])
    try:
        cls = config_class(kind)
    except KeyError:
        line = lines.get(("kind",), 1)
        raise ConfigError([f"{source}:{line}: kind: unknown job kind '{kind}' (expected one of: {', '.join(KINDS)})"]) from None
    try:
        cfg = cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, lines, overridden or set())) from None
    # Ray workers do not share the driver's working directory: make a local output_dir absolute
    # here, once, so every process writes to the same place (URIs such as s3://... stay as they are).
    out = getattr(cfg, "output_dir", None)
    if isinstance(out, str) and "://" not in out and not os.path.isabs(out):
        cfg.output_dir = os.path.abspath(out)
    return cfg


def load_job(path: str | os.PathLike, overrides: list[str] | None = None):
    """Read ``path``, apply overrides, and return the typed job config (raises ConfigError)."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise ConfigError([f"{source}: file not found"])
    text = path.read_text()
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError([f"{source}{line}: not valid YAML: {getattr(e, 'problem', e)}"]) from None
    lines = _line_index(root) if root is not None else {}
    data = data or {}
    overrides = overrides or []
    if overrides:
        if not isinstance(data, dict):
            raise ConfigError([f"{source}:1: the job file must be a mapping with a `kind:` key"])
        data = apply_overrides(data, overrides)
    overridden = {".".join(parse_override(o)[0]) for o in overrides}
    return load_job_dict(data, source, lines, overridden)


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (every default filled in), for config.resolved.yaml."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def write_resolved_config(cfg: BaseModel, output_dir: str | os.PathLike) -> Path:
    """Create ``output_dir`` and write ``config.resolved.yaml`` into it (every job kind does)."""
    return write_text_atomic(Path(output_dir) / RESOLVED_CONFIG, dump_config(cfg))


def explain(kind: str) -> str:
    """Every field of a job kind with its default and description (for `rayapp validate --explain`)."""
    lines: list[str] = []

    def walk(model: type[BaseModel], indent: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            sub = _submodel(ann)
            default = "" if field.is_required() else f" = {field.get_default(call_default_factory=True)!r}"
            if sub is not None:
                lines.append(f"{indent}{name}:  {field.description or ''}")
                walk(sub, indent + "  ")
            else:
                lines.append(f"{indent}{name}{default}  # {field.description or ''}")

    walk(config_class(kind), "")
    return "\n".join(lines)


def _submodel(ann) -> type[BaseModel] | None:
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None
