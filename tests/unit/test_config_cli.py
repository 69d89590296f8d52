"""Config composition and validation through the real CLI, and one-line errors."""
from __future__ import annotations

import subprocess

import pytest
from hydra import compose, initialize_config_module

from ascend_edit.config import ConfigError, register_configs, to_typed
from tests.helpers.cli_runner import run_cli


def cli(*args: str, timeout: int = 120, fresh_interpreter: bool = False) -> subprocess.CompletedProcess:
    return run_cli(args, timeout=timeout, fresh_interpreter=fresh_interpreter)


def compose_typed(overrides: list[str]):
    register_configs()
    with initialize_config_module(config_module="ascend_edit.conf", version_base="1.3"):
        return to_typed(compose(config_name="config", overrides=["output_dir=.", *overrides]))


GROUPS = {
    "model": ["smollm2", "hf", "qwen3_tiny", "qwen3_moe_tiny", "llama_tiny", "qwen3_0p6b_shape",
              "qwen3_1p7b_shape", "qwen3_8b_shape"],
    "target": ["mla", "mla_small", "mla_budget", "gate_swa", "identity"],
    "data": ["shakespeare", "files", "synthetic", "mix"],
    "engine": ["torch", "zero0", "zero1", "zero2", "zero3", "zero3_offload"],
    "device": ["auto", "cpu", "cuda", "npu"],
}
REQUIRED = {("model", "hf"): ["model.path=/x"], ("data", "files"): ["data.path=/x"]}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes_and_validates(group, option):
    cfg = compose_typed([f"{group}={option}", *REQUIRED.get((group, option), [])])
    assert getattr(cfg, group) is not None


def test_experiments_compose():
    from importlib.resources import files

    names = [p.name[:-5] for p in (files("ascend_edit.conf") / "experiment").iterdir() if p.name.endswith(".yaml")]
    assert names, "no experiment configs"
    for name in names:  # with the paths the experiment's sources read (a path no source reads is refused)
        overrides = [f"experiment={name}"]
        for _ in range(3):
            try:
                compose_typed(overrides)
                break
            except ConfigError as err:
                missing = next(key for key in ("model.path", "data.path") if f"{key} is required" in str(err))
                overrides.append(f"{missing}=/x")
        else:
            pytest.fail(f"experiment={name} does not compose")


def test_plus_overrides_cannot_add_keys_nothing_reads():
    """`+key=value` adds a key where the schema has none; the dataclasses would drop it, so a typo changed nothing."""
    with pytest.raises(ConfigError, match=r"target.mla.kv_lora_rnk is not a config key"):
        compose_typed(["+target.mla.kv_lora_rnk=16"])
    with pytest.raises(ConfigError, match=r"engine.zero_option is not a config key"):
        compose_typed(["engine=zero2", "+engine.zero_option.overlap_comm=true"])
    with pytest.raises(ConfigError, match=r"data.mix\[0\].bogus is not a config key"):
        compose_typed(["data=mix", "+data.mix.0.bogus=1"])
    # free-form dicts take new keys: DeepSpeed options (checked by name elsewhere) and model config overrides
    cfg = compose_typed(["engine=zero2", "+engine.zero_options.overlap_comm=true", "+model.overrides.rope_theta=1e4"])
    assert cfg.engine.zero_options == {"overlap_comm": True} and cfg.model.overrides["rope_theta"] == 1e4


def test_a_path_no_source_reads_is_refused():
    """model.path / data.path with a source that ignores them would silently train another teacher / corpus."""
    with pytest.raises(ConfigError, match=r"model.path='/models/Qwen3-8B' is only read with model.source=hf"):
        compose_typed(["model.path=/models/Qwen3-8B"])
    with pytest.raises(ConfigError, match=r"data.path='/data/corpus' is only read with data.source=files or indexed"):
        compose_typed(["data.path=/data/corpus"])
    compose_typed(["model=hf", "model.path=/models/Qwen3-8B", "data=files", "data.path=/data/corpus"])


def test_value_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"target.gate_swa.gate='sideways'"):
        compose_typed(["target=gate_swa", "target.gate_swa.gate=sideways"])
    with pytest.raises(ConfigError, match="engine.offload_params needs engine.zero_stage=3"):
        compose_typed(["engine=zero2", "engine.offload_params=true"])
    with pytest.raises(ConfigError, match="model.path is required"):
        compose_typed(["model=hf"])
    # stage 2 training shared weights needs a whole teacher copy, which ZeRO-3 would leave unpartitioned-unusable
    with pytest.raises(ConfigError, match="distill.model_level.trainable=all keeps a frozen teacher copy outside the engine"):
        compose_typed(["engine=zero3", "distill.model_level.trainable=all"])
    compose_typed(["engine=zero2", "distill.model_level.trainable=all"])  # fine without ZeRO-3
    compose_typed(["engine=zero3", "distill.model_level.trainable=all", "distill.stage=layerwise"])  # no stage 2


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    return proc.stderr


def test_unknown_key_fails_before_loading_with_its_name():
    err = _one_line_error(cli("inspect", "model=qwen3_tiny", "target.windoww=3"))
    assert "windoww" in err


def test_wrong_type_fails_with_its_name():
    err = _one_line_error(cli("inspect", "model=qwen3_tiny", "target.gate_swa.window=wide"))
    assert "window" in err


def test_npu_without_torch_npu_is_one_line():
    proc = cli("model=qwen3_tiny", "target=gate_swa", "device=npu", "data=synthetic")
    err = _one_line_error(proc)
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0 and "device=npu needs torch_npu" in err


def test_unknown_group_option_lists_the_valid_ones():
    err = _one_line_error(cli("inspect", "model=qwen3_tiny", "target=nosuch"))
    assert "target/nosuch" in err and "gate_swa" in err and "mla_small" in err


def test_mistyped_experiment_is_refused_not_skipped(tmp_path):
    """`experiment` is optional in the defaults list, so Hydra alone would skip an unknown name and run the default
    SmolLM2 job; one line names it and lists the experiments, for a plain run and for every multirun job."""
    err = _one_line_error(cli("experiment=qwen3_8b_mal", "data=synthetic"))
    assert "experiment=qwen3_8b_mal not found" in err and "qwen3_8b_mla" in err
    own = tmp_path / "conf" / "experiment"  # an experiment from the user's own config directory is found
    own.mkdir(parents=True)
    (own / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - override /model: qwen3_tiny\n"
                                   "  - override /target: gate_swa\ntarget:\n  gate_swa: {window: 16}\n")
    proc = cli("--config-dir", str(tmp_path / "conf"), "inspect", "experiment=mine", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 0, proc.stderr
    proc = cli("-m", "experiment=tiny_typo", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode != 0 and "experiment=tiny_typo not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_users_config_dir_is_checked_before_the_job_in_either_order(tmp_path):
    """`--config-dir D` (or `hydra.searchpath`) adds the user's experiments: the one-line check composes them too
    (it used to skip every check under --config-dir and refuse the search-path form as an unknown experiment),
    and the flag may follow the subcommand (Hydra's parser stops at the first override after a flag)."""
    own = tmp_path / "conf" / "experiment"
    own.mkdir(parents=True)
    (own / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - override /model: qwen3_tiny\n"
                                   "  - override /target: gate_swa\ntarget:\n  gate_swa: {window: 16}\n")
    conf = str(tmp_path / "conf")
    for i, where in enumerate([["inspect", "--config-dir", conf], [f"--config-dir={conf}", "inspect"],
                               ["inspect", f"hydra.searchpath=[file://{conf}]"]]):
        proc = cli(*where, "experiment=mine", f"hydra.run.dir={tmp_path / f'r{i}'}")
        assert proc.returncode == 0 and "Layer plan" in proc.stdout, proc.stderr
        err = _one_line_error(cli(*where, "experiment=mine", "target.gate_swa.window=0",
                                  f"hydra.run.dir={tmp_path / f'bad{i}'}"))
        assert "target.gate_swa.window=0" in err
        assert not (tmp_path / f"bad{i}").exists()  # refused before Hydra made the run's directory
    err = _one_line_error(cli("inspect", "--config-dir", conf, "experiment=mien"))
    assert "experiment=mien not found" in err and "mine" in err
    # what this check cannot compose as Hydra will is left to the job: a sweep over the user's experiments, another
    # primary config, a directory whose name the override grammar would split
    from ascend_edit.cli import _precheck

    assert _precheck(["-m", "--config-dir", conf, "experiment=mine,tiny"]) is None
    assert _precheck(["--config-dir", conf, "--config-name", "myrun", "task=plan", "data.cache_dir=/c"]) is None
    odd = tmp_path / "c,d"
    (odd / "experiment").mkdir(parents=True)
    (odd / "experiment" / "mine.yaml").write_text((own / "mine.yaml").read_text())
    assert _precheck(["--config-dir", str(odd), "task=inspect", "experiment=mine"]) is None


def test_hydra_flags_go_after_the_overrides():
    """Hydra's parser takes no override after a flag, and a bare `--info` reads the next token as its value."""
    from ascend_edit.cli import _split_subcommand

    assert _split_subcommand(["inspect", "--info"]) == ["task=inspect", "--info"]
    assert _split_subcommand(["--info", "inspect", "a=b"]) == ["task=inspect", "a=b", "--info"]
    assert _split_subcommand(["-i", "config", "inspect"]) == ["task=inspect", "-i", "config"]
    assert _split_subcommand(["inspect", "--config-dir", "/d", "a=b"]) == ["task=inspect", "a=b", "--config-dir", "/d"]
    assert _split_subcommand(["-m", "--cfg", "job", "plan", "a=1,2"]) == ["task=plan", "a=1,2", "-m", "--cfg", "job"]
    proc = cli("inspect", "--info", "searchpath", fresh_interpreter=True)
    assert proc.returncode == 0 and "ascend_edit.conf" in proc.stdout, proc.stderr


def test_unknown_subcommand():
    err = _one_line_error(cli("frobnicate", fresh_interpreter=True))
    assert "unknown subcommand 'frobnicate'" in err


def test_a_delete_override_is_not_taken_for_a_subcommand():
    """Hydra's `~key` (delete) was refused as "unknown subcommand '~key'"."""
    from ascend_edit.cli import _split_subcommand

    assert _split_subcommand(["-m", "~hydra.callbacks.sweep_summary", "plan"]) == [
        "~hydra.callbacks.sweep_summary", "task=plan", "-m"]
    assert _split_subcommand(["~engine.zero_options"]) == ["~engine.zero_options"]


def test_help_and_cfg_job():
    assert "target: gate_swa, gate_swa_windows, identity, mla" in cli("--help", fresh_interpreter=True).stdout
    out = cli("--cfg", "job", "target=gate_swa", "target.gate_swa.window=64")
    assert out.returncode == 0 and "window: 64" in out.stdout


def test_inspect_prints_plan_and_kv_table(tmp_path):
    out = cli("inspect", "model=qwen3_tiny", "target=gate_swa", "target.gate_swa.window=16", "eval.context=1024",
              f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    assert "Layer plan" in out.stdout and "reduction" in out.stdout and "swa" in out.stdout


def test_multirun_sweeps_targets(tmp_path):
    out = cli("-m", "inspect", "model=qwen3_tiny", "target=mla_small,gate_swa", f"hydra.sweep.dir={tmp_path}",
              "target.mla.qk_rope_head_dim=8", "target.mla.qk_nope_head_dim=8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Layer plan") == 2


def test_a_bad_sweep_point_is_refused_before_the_first_job(tmp_path):
    """Every job of a multirun is composed and checked before the first starts: a bad point is one line naming
    it, and no job ran (a grid's last point used to fail only when its turn came, hours in)."""
    sweep = tmp_path / "sweep"
    proc = cli("-m", "inspect", "model=qwen3_tiny", "target=gate_swa", "target.gate_swa.window=16,32,0",
               f"hydra.sweep.dir={sweep}")
    err = _one_line_error(proc)
    assert err.startswith("ascend-edit: error: sweep job 2 of 3 (target.gate_swa.window=0): target.gate_swa.window=0")
    assert "Layer plan" not in proc.stdout and not sweep.exists()
    proc = cli("-m", "inspect", "model=qwen3_tiny", "target=mla_small", "target.mla.qk_nope_head_dim=8",
               "target.mla.kv_lora_rank=128", "target.mla.qk_rope_head_dim=8,64",  # (the first warns when it runs)
               f"hydra.sweep.dir={sweep}")  # a check against the teacher
    assert "sweep job 1 of 2 (target.mla.qk_rope_head_dim=64): target.mla.qk_rope_head_dim=64 exceeds the " \
        "teacher's head_dim=16" in _one_line_error(proc)
    # a rank grid under a KV budget (which chooses every rank): identical jobs, refused
    proc = cli("-m", "inspect", "model=qwen3_tiny", "target=mla_small", "target.mla.qk_nope_head_dim=8",
               "target.mla.qk_rope_head_dim=8", "target.mla.kv_budget=0.25", "target.mla.kv_lora_rank=16,32",
               f"hydra.sweep.dir={sweep}")
    assert "target.mla.kv_lora_rank is swept, but target.mla.kv_budget=0.25 chooses" in _one_line_error(proc)


def test_a_job_never_runs_over_another_tasks_run_directory(tmp_path):
    """Hydra rewrites a run directory's .hydra/ (what export, eval and resume read back) before any task starts:
    another task given that directory is refused first, and the run's saved config is left as it was — for a
    single job and for the jobs of a sweep directory that already holds a sweep."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    saved = "task: convert\nmodel: {source: config, arch: qwen3}\n"
    (run / ".hydra" / "config.yaml").write_text(saved)
    err = _one_line_error(cli("inspect", "model=qwen3_tiny", "target=gate_swa", f"hydra.run.dir={run}"))
    assert f"hydra.run.dir={run} holds a task=convert run: this task=inspect job would overwrite" in err
    sweep = tmp_path / "sweep"
    (sweep / "1" / ".hydra").mkdir(parents=True)
    (sweep / "1" / ".hydra" / "config.yaml").write_text(saved)
    err = _one_line_error(cli("-m", "inspect", "model=qwen3_tiny", "target=gate_swa", "target.gate_swa.window=16,32",
                              f"hydra.sweep.dir={sweep}"))
    assert f"sweep job 1 of 2 (target.gate_swa.window=32): its directory {sweep / '1'} holds a task=convert run" in err
    assert (run / ".hydra" / "config.yaml").read_text() == saved == (sweep / "1" / ".hydra" / "config.yaml").read_text()
    assert not (sweep / "0").exists()  # no job ran


def test_sweep_points_follow_the_experiments_grid_replaced_key_by_key():
    from ascend_edit.cli import sweep_points

    ranks = [p for p in sweep_points(["experiment=sweep_mla_rank"]) or []]
    assert ranks == [["experiment=sweep_mla_rank", f"target.mla.kv_lora_rank={r}"] for r in (32, 64, 128, 256)] or \
        ranks == [[f"target.mla.kv_lora_rank={r}", "experiment=sweep_mla_rank"] for r in (32, 64, 128, 256)]
    points = sweep_points(["experiment=sweep_gate_swa", "target.gate_swa.window=8,16", "device.seed=3"]) or []
    assert len(points) == 2 * 3 and all("device.seed=3" in p for p in points)
    assert {o for p in points for o in p if o.startswith("target.gate_swa.window=")} == {
        "target.gate_swa.window=8", "target.gate_swa.window=16"}


def test_ranks_share_one_run_dir_under_a_launcher():
    from ascend_edit.cli import UserError, shared_run_dir_override

    torchrun = {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "abc123", "MASTER_PORT": "29500"}
    assert shared_run_dir_override(["model=x"], torchrun) == ["hydra.run.dir=runs/dist-abc123"]
    deepspeed = {"WORLD_SIZE": "4", "RANK": "0", "MASTER_ADDR": "node1", "MASTER_PORT": "29501"}
    # no launcher run id: a name from the address and port was shared by every job on that port (a later job
    # resumed an earlier one, or was refused by it): refused, the wrappers pass hydra.run.dir
    with pytest.raises(UserError, match="4-process job without torchrun's run id .* needs hydra.run.dir="):
        shared_run_dir_override([], deepspeed)
    assert shared_run_dir_override(["hydra.run.dir=/x"], deepspeed) == []
    msrun = {"MS_ROLE": "MS_WORKER", "RANK_SIZE": "2", "MS_WORKER_NUM": "2", "RANK_ID": "1", "MS_SCHED_HOST": "h",
             "MS_SCHED_PORT": "8118"}
    with pytest.raises(UserError, match="2-process job"):  # each rank made its own directory from its clock
        shared_run_dir_override([], msrun)
    assert shared_run_dir_override(["hydra.run.dir=/x"], torchrun) == []
    assert shared_run_dir_override([], {"WORLD_SIZE": "1"}) == []


def test_msrun_scheduler_process_runs_no_task(tmp_path):
    """msrun starts an extra scheduler process running the same command: no task runs there (export or eval would
    write a second time beside rank 0, and a ZeRO-3 job would fail joining a process group it is no rank of)."""
    import os

    launcher_keys = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    plain = {k: v for k, v in os.environ.items() if k not in launcher_keys}  # (in-process DeepSpeed tests set them)
    env = {**plain, "MS_ROLE": "MS_SCHED", "MS_WORKER_NUM": "2", "MS_SCHED_HOST": "127.0.0.1",
           "MS_SCHED_PORT": "8118", "RANK_ID": "0", "RANK_SIZE": "2"}
    proc = run_cli(["inspect", "model=qwen3_tiny", "target=gate_swa", "target.gate_swa.window=16",
                    f"hydra.run.dir={tmp_path / 'r'}"], env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Layer plan" not in proc.stdout and "msrun scheduler process" in proc.stdout + proc.stderr


def test_keep_composed_config_never_replaces_an_earlier_runs_config(tmp_path):
    from ascend_edit.cli import keep_composed_config

    hydra_dir, run = tmp_path / "hydra", tmp_path / "run"
    (hydra_dir / ".hydra").mkdir(parents=True)
    (hydra_dir / ".hydra" / "config.yaml").write_text("seed: 1\n")
    keep_composed_config(hydra_dir, run)
    assert (run / ".hydra" / "config.yaml").read_text() == "seed: 1\n"
    (hydra_dir / ".hydra" / "config.yaml").write_text("seed: 7\n")  # a later command aimed at the same run
    keep_composed_config(hydra_dir, run)
    assert (run / ".hydra" / "config.yaml").read_text() == "seed: 1\n"


def test_sweep_and_run_directories_are_checked_whatever_the_override_looks_like(tmp_path):
    """`++hydra.run.dir=`, `++hydra.sweep.dir=` and a custom `hydra.sweep.subdir` skipped every directory check (a
    user's report.md and summary.csv were overwritten, exit 0); a fixed output_dir made every job of a sweep write
    into, and resume, one directory; an empty sweep range was a traceback."""
    mine = tmp_path / "mine"
    (mine / "job0").mkdir(parents=True)
    (mine / "job0" / "report.md").write_text("my notes")
    for args in (["inspect", "model=qwen3_tiny", f"++hydra.run.dir={mine}"],
                 ["-m", "inspect", "model=qwen3_tiny", f"++hydra.sweep.dir={mine}"],
                 ["-m", "inspect", "model=qwen3_tiny", f"hydra.sweep.dir={mine}", "hydra.sweep.subdir=job${hydra.job.num}"]):
        assert "holds no ascend-edit" in _one_line_error(cli(*args)), args
    assert sorted(p.name for p in mine.rglob("*")) == ["job0", "report.md"]
    proc = cli("-m", "inspect", "model=qwen3_tiny", "target.mla.kv_lora_rank=16,32", f"output_dir={tmp_path / 'one'}")
    assert "is fixed for a sweep of 2 jobs: each would write into it and resume the one before" in _one_line_error(proc)
    assert "the sweep has no jobs" in _one_line_error(cli("-m", "inspect", "model=qwen3_tiny",
                                                          "target.mla.kv_lora_rank=range(16,8)"))


def test_a_sweep_under_a_launcher_is_refused(monkeypatch):
    """Each rank resolved its own sweep directory from its clock: a job's checkpoint halves landed in two."""
    from ascend_edit.cli import _sweep_problem

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "a sweep (-m) runs its jobs one after another, each in one process" in _sweep_problem(
        ["task=inspect", "model=qwen3_tiny", "target.mla.kv_lora_rank=16,32"])
