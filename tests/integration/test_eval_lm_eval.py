"""The lm-eval adapter runs its bundled local task on a tiny exported model (skipped without the extra)."""
from __future__ import annotations

import json

import pytest
import torch

from ascend_edit.config import MLAConfig, TargetConfig
from ascend_edit.eval.lm_eval_adapter import CLOZE_DATA, CLOZE_TASK, build_cloze, evaluate_export
from ascend_edit.models.export import export_converted
from ascend_edit.models.loading import build_from_config
from ascend_edit.models.surgery import build_plan, edit_model, unwrap_targets
from tests.helpers.tiny_checkpoint import char_tokenizer

DOCS = [("The old cat sits by the warm fire. Two young dogs run across the field. A small bird flies high above "
         "the trees. The sun is warm on the stone today. Rain falls softly on the roof at night."),
        ("Tall ships sail out on the grey sea. The men fish from their small boats. Cold waves hit the rocks "
         "of the shore. White gulls cry loudly above the harbour. The tide turns slowly in the evening.")]


def test_cloze_items_hold_the_true_next_sentence():
    items = build_cloze(DOCS, items=10, context_sentences=3, choices=3, seed=1)
    assert items and all(len(item["choices"]) == 3 for item in items)
    for item in items:
        doc = next(d for d in DOCS if item["context"] in d)
        assert doc.split(item["context"])[1].strip().startswith(item["choices"][item["label"]])
        assert all(c not in doc for i, c in enumerate(item["choices"]) if i != item["label"])
    assert build_cloze(DOCS, items=10, choices=3, seed=1) == items


def test_bundled_cloze_data_is_valid():
    rows = [json.loads(line) for line in CLOZE_DATA.read_text().splitlines()]
    assert len(rows) >= 100
    assert all(0 <= r["label"] < len(r["choices"]) == 4 for r in rows)


def test_lm_eval_runs_the_bundled_task_on_an_exported_model(tmp_path):
    pytest.importorskip("lm_eval")
    rows = [json.loads(line) for line in CLOZE_DATA.read_text().splitlines()][:8]
    tokenizer = char_tokenizer([r["context"] + "".join(r["choices"]) for r in rows])
    torch.manual_seed(0)
    model = build_from_config("qwen3", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                        "vocab_size": 128, "max_position_embeddings": 512, "eos_token_id": 1,
                                        "pad_token_id": 0})
    target = TargetConfig(kind="mla", init="random", calibration_batches=0,
                          mla=MLAConfig(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16))
    edit_model(model, build_plan(2, target), target)
    unwrap_targets(model)
    export = export_converted(model, tmp_path / "hf", tokenizer=tokenizer)
    results = evaluate_export(export.directory, limit=8, batch_size=4,
                              trust_remote_code=export.format == "auto_map")
    acc = results[CLOZE_TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0 and results[CLOZE_TASK]["acc_norm,none"] >= 0.0


@pytest.mark.parametrize("argv", [["build", "--output", "x.jsonl", "--items", "0"],
                                  ["build", "--output", "x.jsonl", "--items", "-5"],
                                  ["run", "model", "--limit", "0"]])
def test_counts_below_one_are_refused_by_name(argv, tmp_path, monkeypatch, capsys):
    from ascend_edit.eval.lm_eval_adapter import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
