#!/usr/bin/env bash
# Launch ascend-edit under the DeepSpeed launcher (it ssh/pdsh-es to the hosts of a hostfile).
#
#   DEVICE=npu VISIBLE_DEVICES=0,1 launch/deepspeed.sh experiment=qwen3_8b_mla model.path=/models/Qwen3-8B data.path=/data/corpus
#   HOSTFILE=hosts NNODES=2 NPROC=8 MASTER_ADDR=10.0.0.1 launch/deepspeed.sh experiment=...
#
# HOSTFILE: DeepSpeed hostfile ("host slots=N" lines); NNODES / NPROC, when set, limit it to
# its first N hosts / N devices per host. Without a hostfile the job runs on this node: VISIBLE_DEVICES picks devices (passed as
# --include localhost:<ids>, DeepSpeed then sets the visibility variable per rank itself),
# otherwise NPROC devices. MASTER_ADDR/MASTER_PORT: rendezvous (DeepSpeed infers the address
# when unset). Other knobs: see common.sh.
#
# Remote hosts get only the variables DeepSpeed forwards (PYTHON*, HCCL_*/ASCEND_* on NPU,
# NCCL_* on CUDA) plus those listed in a .deepspeed_env file (cwd or home dir) — DS_ACCELERATOR,
# set below for this host's ranks, included: add a line DS_ACCELERATOR=npu there for the others.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_take_dry_run "$@"
set -- "${LAUNCH_ARGS[@]+"${LAUNCH_ARGS[@]}"}"

DEVICE=${DEVICE:-$(launch_detect_device)}
NPROC_GIVEN=${NPROC:-}  # with a hostfile, an unset NPROC means "every slot the hostfile lists"
NPROC=${NPROC:-$(launch_default_nproc)}
launch_check_count NPROC "$NPROC"
launch_check_visible_devices
launch_device_env
# DeepSpeed picks its accelerator by probing; naming it avoids a wrong guess (e.g. CUDA on a
# host that has both stacks installed).
LAUNCH_ENV+=("DS_ACCELERATOR=$DEVICE")

ARGS=()
if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || launch_die "HOSTFILE=$HOSTFILE does not exist"
  if [[ -n "${VISIBLE_DEVICES:-}" ]]; then
    launch_die "VISIBLE_DEVICES picks devices on one node; with HOSTFILE, list them as slots there"
  fi
  ARGS+=(--hostfile "$HOSTFILE")
  if [[ -n "${NNODES:-}" ]]; then
    launch_check_count NNODES "$NNODES"
    ARGS+=(--num_nodes "$NNODES")
  fi
  if [[ -n "$NPROC_GIVEN" ]]; then
    ARGS+=(--num_gpus "$NPROC")
  fi
elif [[ -n "${VISIBLE_DEVICES:-}" ]]; then
  ARGS+=(--include "localhost:$VISIBLE_DEVICES")
else
  ARGS+=(--num_gpus "$NPROC")
fi
if [[ -n "${MASTER_ADDR:-}" ]]; then
  ARGS+=(--master_addr "$MASTER_ADDR")
fi
ARGS+=(--master_port "${MASTER_PORT:-29500}")

# World size of a hostfile job: its first NNODES hosts (all without NNODES), NPROC devices on each (its slots
# without NPROC), as DeepSpeed's --num_nodes / --num_gpus pick them; without a hostfile, this node's NPROC.
hostfile_world_size() {
  local host slots total=0 hosts=0
  while read -r host slots _; do
    [[ -z "$host" || "$host" == \#* ]] && continue
    [[ -n "${NNODES:-}" && $hosts -ge $NNODES ]] && break
    slots=${slots#slots=}
    [[ "$slots" =~ ^[0-9]+$ ]] || launch_die "HOSTFILE=$HOSTFILE: '$host ${slots}' is not 'host slots=N'"
    total=$((total + ${NPROC_GIVEN:-$slots}))
    hosts=$((hosts + 1))
  done < "$HOSTFILE"
  echo "$total"
}

launch_hydra_run_dir "$@"
# computed first: a bad hostfile's launch_die inside $( ... ) would only leave the subshell, and the launch went on
if [[ -n "${HOSTFILE:-}" ]]; then
  WORLD=$(hostfile_world_size) || exit $?
else
  WORLD=$NPROC
fi
launch_precheck "$WORLD" "$@" \
  "${HYDRA_RUN_DIR_ARG[@]+"${HYDRA_RUN_DIR_ARG[@]}"}"
# --no_local_rank: otherwise every rank gets --local_rank=N, which Hydra rejects as an override
# (LOCAL_RANK is exported either way).
launch_run deepspeed "${ARGS[@]}" --no_local_rank --module ascend_edit.cli \
  "$@" "${HYDRA_RUN_DIR_ARG[@]}"
