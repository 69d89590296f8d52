"""Which jobs load a saved converted model partitioned (models/zero3.py `partitioned_load_config`), and the
header checks and tensor-by-tensor writes of models/checkpoint.py `load_partitioned_weights` (here on plain
tensors, which it copies without any collective; the ZeRO-3 runs are tests/integration/
test_zero3_separate_jobs.py)."""
from __future__ import annotations

import pytest
import torch

from ascend_edit.config import EngineConfig, MLAConfig, TargetConfig
from ascend_edit.models.checkpoint import (
    converted_state_dict,
    load_partitioned_weights,
    read_converted_weights,
    save_converted,
)
from ascend_edit.models.zero3 import partitioned_load_config
from tests.helpers.converted import converted_tiny

TARGET = TargetConfig(kind="mla", init="random", mla=MLAConfig(kv_lora_rank=16, qk_rope_head_dim=8,
                                                               qk_nope_head_dim=8, v_head_dim=16))


@pytest.mark.parametrize("engine,stage3", [
    (EngineConfig(), False),
    (EngineConfig(kind="deepspeed", zero_stage=2), False),  # ZeRO 1/2 keep whole replicas of frozen weights
    (EngineConfig(kind="deepspeed", zero_stage=3), True),
    (EngineConfig(kind="deepspeed", zero_stage=3, offload_params=True), True),
])
def test_the_engine_decides_a_partitioned_load(engine, stage3):
    config = partitioned_load_config(engine, torch.bfloat16)
    assert (config is not None) == stage3
    if config is not None:
        assert config["zero_optimization"]["stage"] == 3 and config["bf16"]["enabled"]
        assert ("offload_param" in config["zero_optimization"]) == engine.offload_params


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = converted_tiny(TARGET)
    from ascend_edit.models.surgery import unwrap_targets

    directory = save_converted(model, TARGET, tmp_path_factory.mktemp("conv") / "converted")
    return unwrap_targets(model), directory


def fresh_state(model) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(t) for name, t in converted_state_dict(model).items() if "rotary_emb" not in name}


def test_every_stored_tensor_is_written_once(saved):
    model, directory = saved
    own = fresh_state(model)
    load_partitioned_weights(own, directory)
    stored = read_converted_weights(directory)
    assert sorted(own) == sorted(stored)
    assert all(torch.equal(own[name], tensor) for name, tensor in stored.items())


# missing: the model has it, the files do not; unexpected: the other way round
@pytest.mark.parametrize("change,named", [("drop", "unexpected"), ("extra", "missing"), ("shape", "shape mismatches")])
def test_a_model_that_does_not_match_the_files_is_refused_before_any_write(saved, change, named):
    model, directory = saved
    own = fresh_state(model)
    name = next(n for n in own if n.endswith("kv_a_proj_with_mqa.weight"))
    if change == "drop":
        own.pop(name)
    elif change == "extra":
        name = "model.extra.weight"
        own[name] = torch.zeros(2)
    else:
        own[name] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="weights do not match the plan") as err:
        load_partitioned_weights(own, directory)
    message = str(err.value)
    assert message.startswith(str(directory)) and "\n" not in message
    assert f"{named} ['{name}" in message, message
    assert all(not t.any() for t in own.values()), "nothing is written when the check fails"
