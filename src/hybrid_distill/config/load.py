"""Read and validate a run config against schema.yaml, filling the schema's defaults; or read a job's slice of one."""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from hybrid_distill.config.reads import SLICE_KEY, view_of

SCHEMA_PATH = Path(str(resources.files("hybrid_distill.config") / "schema.yaml"))


class ConfigError(ValueError):
    """A config the schema or the teacher rejects; the message is one line naming the key."""


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _with_defaults(validator_class):
    """A validator that writes each property's `default` into the instance before checking it."""
    check_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from check_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def describe_error(error: jsonschema.ValidationError) -> str:
    """`config: data.seq_len: 'x' is not of type 'integer'`, one line."""
    where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    message = " ".join(error.message.split())
    if error.validator == "additionalProperties":
        message = message.replace("Additional properties are not allowed", "unknown key")
    return f"config: {where}: {message}"


def validate_config(config: dict | None) -> dict:
    """A copy of `config` with defaults filled; raises ConfigError on the first problem."""
    schema = load_schema()
    filled = copy.deepcopy(config or {})
    validator = _with_defaults(jsonschema.validators.validator_for(schema))(schema)
    errors = sorted(validator.iter_errors(filled), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(describe_error(errors[0]))
    return filled


def load_config(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    if raw and SLICE_KEY in raw:  # a job's slice (reads.py), validated when the workflow wrote it
        return view_of(raw)
    return validate_config(raw)
