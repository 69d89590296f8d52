"""lm-evaluation-harness on an exported model, offline, with a task bundled as local data.

Optional extra: `pip install 'ascend_edit[lm_eval]'`. The harness loads the exported checkpoint through
its own `hf` model (an export in auto_map format runs the code it ships: only with `--trust-remote-code`), and
finds the project's
tasks under `lm_eval_tasks/` (`--include_path`):

* `ascend_edit_heldout_cloze` — multiple choice, accuracy: given three sentences of held-out prose that
  follow one another among the kept ones (6-40 words), pick the next kept sentence among four (three distractors from other documents). Built from the
  out-of-domain `python_docs` set (ascend_edit/data/heldout.py; Python documentation, PSF licence) by
  `python -m ascend_edit.eval.lm_eval_adapter build --output FILE`; deterministic from its seed.

    python -m ascend_edit.eval.lm_eval_adapter run EXPORT_DIR [--limit N] [--device cpu] [--trust-remote-code]
    # or the harness's own CLI, the same thing (",trust_remote_code=True" only for an auto_map export whose
    # shipped code you trust; a native export needs none):
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf \
        --model_args pretrained=EXPORT_DIR --tasks ascend_edit_heldout_cloze \
        --include_path $(python -c "import ascend_edit.eval.lm_eval_adapter as a; print(a.TASK_DIR)")

Standard tasks need their data: see docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
CLOZE_TASK = "ascend_edit_heldout_cloze"
CLOZE_DATA = TASK_DIR / "heldout_cloze.jsonl"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences(document: str, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Sentences of a document's prose paragraphs, in order (short fragments and run-ons dropped)."""
    found = []
    for paragraph in document.split("\n\n"):
        for sentence in _SENTENCE_END.split(paragraph.strip()):
            if min_words <= len(sentence.split()) <= max_words and sentence[-1] in ".!?":
                found.append(sentence)
    return found


def build_cloze(documents: list[str], items: int = 200, context_sentences: int = 3, choices: int = 4,
                seed: int = 0) -> list[dict]:
    """Multiple-choice items: `context_sentences` sentences, the true next one among `choices` options."""
    rng = random.Random(seed)
    per_doc = [sentences(doc) for doc in documents]
    candidates = [(d, i) for d, sents in enumerate(per_doc) for i in range(context_sentences, len(sents))]
    if len(per_doc) < 2 or not candidates:
        raise ValueError("cloze: need at least two documents with enough sentences")
    rng.shuffle(candidates)
    out = []
    for d, i in candidates[:items]:
        context = " ".join(per_doc[d][i - context_sentences:i])
        others = [s for k, sents in enumerate(per_doc) if k != d for s in sents]
        options = [per_doc[d][i], *rng.sample(others, choices - 1)]
        rng.shuffle(options)
        out.append({"context": context, "choices": options, "label": options.index(per_doc[d][i])})
    return out


def write_cloze(path: Path, items: int = 200, seed: int = 0, overwrite: bool = False) -> Path:
    from ascend_edit.data.heldout import python_docs_documents

    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists: give another --output, or --overwrite to replace it")
    rows = build_cloze(python_docs_documents(), items=items, seed=seed)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def evaluate_export(model_dir: Path, tasks: list[str] | None = None, limit: int | None = None,
                    batch_size: int = 4, device: str = "cpu", dtype: str = "float32",
                    trust_remote_code: bool = False) -> dict:
    """Run lm-eval tasks (default: the bundled cloze) on an exported checkpoint, no network; returns
    {task: {metric: value}}. An auto_map export loads only with `trust_remote_code` (it runs shipped code)."""
    model_dir = Path(model_dir)
    if (model_dir / "ascend_edit.json").is_file() or (model_dir / "converted").is_dir():
        raise ValueError(f"{model_dir} is a converted model (or a run holding one), not an export: transformers would "
                         "load the teacher's architecture over it; run `ascend-edit export export.checkpoint="
                         f"{model_dir}` and evaluate its output")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} holds no config.json: not an exported checkpoint (ascend-edit export writes one)")
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"{model_dir} holds no tokenizer (tokenizer.json / tokenizer_config.json): copy the "
                         "teacher's tokenizer files in, or export a run whose teacher has one")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise ValueError(f"{model_dir} is an auto_map export: it runs the modeling code it ships; pass "
                         "--trust-remote-code if you trust that code")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never reach for a hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("lm-eval is not installed: pip install 'ascend_edit[lm_eval]'") from err
    model_args = {"pretrained": str(model_dir), "dtype": dtype, "trust_remote_code": trust_remote_code}
    results = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks or [CLOZE_TASK],
                                      task_manager=TaskManager(include_path=str(TASK_DIR)), limit=limit,
                                      batch_size=batch_size, device=device, log_samples=False,
                                      bootstrap_iters=0)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in results["results"].items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="lm-eval on an exported model with the bundled local tasks")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write cloze data (the bundled task's file is CLOZE_DATA: give it as "
                                         "--output with --overwrite to regenerate it)")
    build.add_argument("--output", type=Path, required=True)
    build.add_argument("--overwrite", action="store_true")
    build.add_argument("--items", type=int, default=200)
    build.add_argument("--seed", type=int, default=0)
    run = sub.add_parser("run", help="evaluate an exported checkpoint")
    run.add_argument("model_dir", type=Path)
    run.add_argument("--tasks", nargs="*", default=[CLOZE_TASK])
    run.add_argument("--limit", type=int)
    run.add_argument("--batch-size", type=int, default=4)
    run.add_argument("--device", default="cpu")
    run.add_argument("--trust-remote-code", action="store_true",
                     help="allow an auto_map export to run the modeling code it ships")
    args = parser.parse_args(argv)
    for flag in ("items", "limit", "batch_size"):  # 0 or negative wrote an empty (or a silently short) file
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    try:
        if args.command == "build":
            print(f"wrote {write_cloze(args.output, items=args.items, seed=args.seed, overwrite=args.overwrite)}")
            return
        results = evaluate_export(args.model_dir, args.tasks, args.limit, args.batch_size, args.device,
                                  trust_remote_code=args.trust_remote_code)
    except (ValueError, OSError, ImportError) as err:
        raise SystemExit(f"lm_eval_adapter: error: {' '.join(str(err).split())}") from None
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
