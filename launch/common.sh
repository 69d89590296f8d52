# shellcheck shell=bash
# Helpers shared by the launch/ wrappers (sourced, not run): device environment, one Hydra
# output dir per run, and printing the exact command before running it (or only printing it).
#
# Knobs read from the environment:
#   DEVICE=npu|cuda|cpu   accelerator family (default: npu if npu-smi exists, else cuda if
#                         nvidia-smi exists, else cpu)
#   VISIBLE_DEVICES=0,1   devices to use; becomes ASCEND_RT_VISIBLE_DEVICES (npu) or
#                         CUDA_VISIBLE_DEVICES (cuda)
#   NPROC                 processes per node (default: number of VISIBLE_DEVICES, else 1)
#   RUN_DIR               Hydra output dir shared by all ranks (default: runs/<date>/<time>, the CLI's own layout)
#   DRY_RUN=1             print the command only (same as passing --dry-run first)

LAUNCH_ENV=()         # KEY=VALUE pairs the command runs with; printed in front of it
HYDRA_RUN_DIR_ARG=()  # hydra.run.dir=... unless the user passed one

# --dry-run anywhere among the arguments (not only first): DRY_RUN=1, and LAUNCH_ARGS holds the rest. Left among
# the overrides it would reach every rank as a Hydra override and launch the job it was meant to preview.
launch_take_dry_run() {
  LAUNCH_ARGS=()
  local arg
  for arg in "$@"; do
    if [[ "$arg" == --dry-run ]]; then
      DRY_RUN=1
    else
      LAUNCH_ARGS+=("$arg")
    fi
  done
}

# Check the configuration once, in this process, before N ranks start: bad input then ends with one line instead of
# one per rank plus the launcher's own failure report. WORLD_SIZE (first argument) sizes the batch checks; the
# rest are the CLI arguments. LAUNCH_PRECHECK=0 skips it (e.g. a login node without the job's Python environment).
launch_precheck() {
  [[ "${DRY_RUN:-0}" == 1 || "${LAUNCH_PRECHECK:-1}" == 0 ]] && return 0
  local world=$1
  shift
  local python
  python=$(command -v python || command -v python3) || launch_die "no python on PATH for the config check (LAUNCH_PRECHECK=0 skips it)"
  ASCEND_EDIT_CHECK_ONLY=1 WORLD_SIZE=$world "$python" -m ascend_edit.cli "$@" || exit $?
}

launch_die() {
  echo "launch: $*" >&2
  exit 2
}

launch_detect_device() {
  if command -v npu-smi >/dev/null 2>&1; then
    echo npu
  elif command -v nvidia-smi >/dev/null 2>&1; then
    echo cuda
  else
    echo cpu
  fi
}

launch_check_count() {  # NAME VALUE: a positive integer or die
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || launch_die "$1 must be a positive integer, got '$2'"
}

launch_default_nproc() {
  if [[ -n "${VISIBLE_DEVICES:-}" ]]; then
    local -a ids
    IFS=, read -r -a ids <<<"$VISIBLE_DEVICES"
    echo "${#ids[@]}"
  else
    echo 1
  fi
}

# Communication defaults per device; a value the user already exported wins.
launch_device_env() {
  case "$DEVICE" in
    npu)
      # HCCL socket set-up timeout, s (CANN range 120-7200, default 120): loading a large
      # teacher on every rank before the first collective easily takes longer than 120 s.
      LAUNCH_ENV+=("HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}")
      # HCCL wait for a peer inside a collective, s; a multiple of 68 because older CANN
      # rounds the value down to one.
      LAUNCH_ENV+=("HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1836}")
      ;;
    cuda)
      # 3 (torch's default): a failed or timed-out collective ends the process instead of
      # leaving the other ranks hanging. Written out so the printed command records it.
      LAUNCH_ENV+=("TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}")
      ;;
    cpu) ;;
    *) launch_die "DEVICE must be npu, cuda or cpu, got '$DEVICE'" ;;
  esac
}

launch_check_visible_devices() {
  if [[ -n "${VISIBLE_DEVICES:-}" && "$DEVICE" == cpu ]]; then
    launch_die "VISIBLE_DEVICES=$VISIBLE_DEVICES is set, but DEVICE=cpu has no devices to pick"
  fi
}

# VISIBLE_DEVICES -> the variable the device's runtime reads.
launch_visible_devices_env() {
  launch_check_visible_devices
  [[ -n "${VISIBLE_DEVICES:-}" ]] || return 0
  case "$DEVICE" in
    npu) LAUNCH_ENV+=("ASCEND_RT_VISIBLE_DEVICES=$VISIBLE_DEVICES") ;;
    cuda) LAUNCH_ENV+=("CUDA_VISIBLE_DEVICES=$VISIBLE_DEVICES") ;;
  esac
}

# Every rank must write into one Hydra output dir; left alone, each rank makes its own from
# its own clock. RUN_DIR is computed once, here, unless the user set it or passed
# hydra.run.dir=... among the overrides.
launch_hydra_run_dir() {  # the user's overrides
  # the last one, with or without a + / ++ prefix, as Hydra takes it (an added hydra.run.dir= after a user's
  # ++hydra.run.dir= would win, and a resume would start over elsewhere)
  local given
  if given=$(launch_given_run_dir "$@"); then
    RUN_DIR=$given
    return 0
  fi
  RUN_DIR=${RUN_DIR:-runs/$(date +%Y-%m-%d/%H-%M-%S.%3N)}
  HYDRA_RUN_DIR_ARG=("hydra.run.dir=$RUN_DIR")
}

# Prints the last hydra.run.dir= among the overrides (also +/++hydra.run.dir=); fails when there is none.
launch_given_run_dir() {
  local arg found=0 value=
  for arg in "$@"; do
    case "$arg" in
      hydra.run.dir=* | +hydra.run.dir=* | ++hydra.run.dir=*) value=${arg#*hydra.run.dir=}; found=1 ;;
    esac
  done
  [[ $found == 1 ]] && echo "$value"
}

# Launchers started once per node (torchrun, msrun): each node computes its own defaults, so on more than one
# node a default would differ between nodes (a run directory from each node's clock: checkpoints torn across two
# directories) or be the same on every node (node rank 0 twice; 127.0.0.1 as the master, where each node then
# waits for workers that never come). Refused in one line instead.
launch_check_multinode() {  # the user's overrides
  [[ "$NNODES" == 1 ]] && return 0
  [[ -n "${MASTER_ADDR:-}" ]] || launch_die "NNODES=$NNODES needs MASTER_ADDR (the host of node 0), the same on every node"
  [[ -n "${NODE_RANK:-${SLURM_NODEID:-}}" ]] || launch_die "NNODES=$NNODES needs NODE_RANK (0..$((NNODES - 1)), this node's) or Slurm's SLURM_NODEID"
  launch_given_run_dir "$@" >/dev/null && return 0
  [[ -n "${RUN_DIR:-}" ]] || launch_die "NNODES=$NNODES needs RUN_DIR (or hydra.run.dir=...): one run directory on shared storage, the same on every node"
}

# One word as the shell reads it: bare when safe, else single-quoted.
launch_quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    local close_escape_reopen="'\\''"  # a ' inside single quotes is written '\''
    printf "'%s'" "${1//\'/$close_escape_reopen}"
  fi
}

# Print the command (copy-pasteable, with the environment it gets), then replace this shell
# with it unless DRY_RUN=1.
launch_run() {
  local word line="+"
  for word in "${LAUNCH_ENV[@]}" "$@"; do
    line+=" $(launch_quote "$word")"
  done
  echo "$line"
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    return 0
  fi
  exec env "${LAUNCH_ENV[@]}" "$@"
}
