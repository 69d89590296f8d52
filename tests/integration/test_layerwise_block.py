"""Stage 1 matching decoder-block outputs (`distill.layerwise.match=block`) on the small trained teacher."""
from __future__ import annotations

import torch

from ascend_edit.config import MLAConfig, ModelConfig, TargetConfig
from ascend_edit.data import build_train_eval, load_documents
from ascend_edit.distill.layerwise import LayerwiseObjective
from ascend_edit.models.loading import load_teacher
from ascend_edit.models.surgery import build_plan, edit_model, set_trainable


def _setup(trained_teacher, kind: str):
    model, tokenizer = load_teacher(ModelConfig(source="hf", path=str(trained_teacher)))
    cfg = TargetConfig(kind=kind, init="random",
                       mla=MLAConfig(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16))
    edit_model(model, build_plan(model.config.num_hidden_layers, cfg), cfg)
    docs = load_documents(trained_teacher / "corpus.txt", format="text", split_on_blank_lines=True)
    train, _ = build_train_eval(docs, tokenizer, 64, eval_fraction=0.1)
    batch = {k: torch.stack([train[i][k] for i in range(8)]) for k in ("input_ids", "position_ids")}
    return model, batch


def test_identity_targets_have_zero_block_loss(trained_teacher):
    model, batch = _setup(trained_teacher, "identity")
    with torch.no_grad():
        loss, metrics = LayerwiseObjective("mse", match="block")(model, batch)
    assert loss.item() == 0.0 and all(v == 0.0 for k, v in metrics.items() if k.startswith("layer/"))


def test_block_matching_lowers_every_layers_block_loss(trained_teacher):
    torch.manual_seed(0)
    model, batch = _setup(trained_teacher, "mla")
    objective = LayerwiseObjective("nmse", match="block")
    params = set_trainable(model, "target")
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    with torch.no_grad():
        _, first = objective(model, batch)
    for _ in range(40):
        loss, _ = objective(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        _, last = objective(model, batch)
    for key in (k for k in first if k.startswith("layer/")):
        assert last[key] < 0.6 * first[key], (key, first[key], last[key])
