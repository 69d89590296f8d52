#!/usr/bin/env bash
# Launch ascend-edit (a PyTorch job) under MindSpore's msrun on Ascend.
#
#   VISIBLE_DEVICES=0,1,2,3,4,5,6,7 launch/msrun.sh experiment=qwen3_8b_mla model.path=/models/Qwen3-8B data.path=/data/corpus
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=8 RUN_DIR=/shared/run1 launch/msrun.sh ...
#
# MASTER_ADDR/MASTER_PORT: msrun's scheduler (defaults 127.0.0.1 / 8118, msrun's own, on one node;
# MASTER_ADDR, NODE_RANK (or $SLURM_NODEID) and RUN_DIR are required with NNODES > 1); the
# workers rendezvous there too. NODE_RANK (default $SLURM_NODEID, else 0 on one node) is always passed:
# without it a multi-node msrun assigns ranks only after start-up, too late for PyTorch.
# LOG_DIR: per-worker logs (default $RUN_DIR/msrun_log); CLUSTER_TIMEOUT: seconds msrun waits
# for all workers to register (default 600). DEVICE defaults to npu. Other knobs: see common.sh.
#
# msrun also runs the command once more as its scheduler (MS_ROLE=MS_SCHED); the CLI sees
# DistEnv.msrun_scheduler and exits there.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_take_dry_run "$@"
set -- "${LAUNCH_ARGS[@]+"${LAUNCH_ARGS[@]}"}"

DEVICE=${DEVICE:-npu}
NPROC=${NPROC:-$(launch_default_nproc)}
NNODES=${NNODES:-1}
launch_check_count NPROC "$NPROC"
launch_check_count NNODES "$NNODES"
launch_check_multinode "$@"
launch_device_env
launch_visible_devices_env
# msrun exports no per-node worker count; ascend_edit.distributed reads this one.
LAUNCH_ENV+=("LOCAL_WORLD_SIZE=$NPROC")

launch_hydra_run_dir "$@"
launch_precheck $((NNODES * NPROC)) "$@" "${HYDRA_RUN_DIR_ARG[@]+"${HYDRA_RUN_DIR_ARG[@]}"}"
LOG_DIR=${LOG_DIR:-$RUN_DIR/msrun_log}
# The program must be the literal word `python`: msrun prefixes anything else with `python`.
launch_run msrun \
  "--worker_num=$((NNODES * NPROC))" \
  "--local_worker_num=$NPROC" \
  "--master_addr=${MASTER_ADDR:-127.0.0.1}" \
  "--master_port=${MASTER_PORT:-8118}" \
  "--node_rank=${NODE_RANK:-${SLURM_NODEID:-0}}" \
  "--log_dir=$LOG_DIR" \
  "--join=True" \
  "--cluster_time_out=${CLUSTER_TIMEOUT:-600}" \
  python -m ascend_edit.cli "$@" "${HYDRA_RUN_DIR_ARG[@]}"
