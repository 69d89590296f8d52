#!/usr/bin/env bash
# Launch ascend-edit under torchrun: one node (default) or one node of a multi-node job.
#
#   DEVICE=npu VISIBLE_DEVICES=0,1,2,3 launch/torchrun.sh experiment=qwen3_8b_mla model.path=/models/Qwen3-8B data.path=/data/corpus distill.model_level.lr=1e-4
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC=8 RUN_DIR=/shared/run1 launch/torchrun.sh ...
#
# Multi node: NNODES, NODE_RANK (or $SLURM_NODEID; required), MASTER_ADDR (host of node 0,
# required), MASTER_PORT (default 29500). Run it once per node with the same RUN_DIR on a
# shared filesystem (required: each node's own timestamp would differ). Other knobs: see common.sh.
# --dry-run (anywhere) prints the command only; everything else goes to the CLI as Hydra overrides, checked
# once here before the ranks start.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_take_dry_run "$@"
set -- "${LAUNCH_ARGS[@]+"${LAUNCH_ARGS[@]}"}"

DEVICE=${DEVICE:-$(launch_detect_device)}
NPROC=${NPROC:-$(launch_default_nproc)}
NNODES=${NNODES:-1}
launch_check_count NPROC "$NPROC"
launch_check_count NNODES "$NNODES"
launch_device_env
launch_visible_devices_env

launch_check_multinode "$@"
if [[ "$NNODES" == 1 && -z "${MASTER_ADDR:-}" ]]; then
  # --standalone: a local rendezvous on a free port, so two jobs on one host do not collide.
  RENDEZVOUS=(--standalone)
else
  [[ -n "${MASTER_ADDR:-}" ]] || launch_die "NNODES=$NNODES needs MASTER_ADDR (the host of node 0)"
  RENDEZVOUS=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-${SLURM_NODEID:-0}}"
    --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
fi

launch_hydra_run_dir "$@"
launch_precheck $((NNODES * NPROC)) "$@" "${HYDRA_RUN_DIR_ARG[@]+"${HYDRA_RUN_DIR_ARG[@]}"}"
launch_run torchrun "${RENDEZVOUS[@]}" --nproc_per_node "$NPROC" \
  -m ascend_edit.cli "$@" "${HYDRA_RUN_DIR_ARG[@]}"
