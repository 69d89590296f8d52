#!/usr/bin/env bash
# Build docker/npu.Dockerfile as far as is possible without a CANN base image, on a machine with
# Debian's podman and no Ascend hardware (the machine docker/verify-cpu.sh runs on):
#
#   1. with the plain Debian base (no CANN): the build must stop at the CANN check;
#   2. with a STAND-IN base (the Debian base + a version.cfg naming CANN_VERSION and a set_env.sh
#      that only says it is a stand-in; no CANN libraries): every later step runs -- torch and
#      torch_npu installed and checked against the triple, the project installed with
#      `.[npu,test]`, the entrypoint in place -- and the image's entrypoint runs a command.
#
# What it cannot check: anything that needs CANN itself (`import torch_npu`, the NPU tests).
#
#   docker/build-npu-standin.sh          # run as root, after docker/verify-cpu.sh made the base
#
# Environment (all optional): BASE_IMAGE (localhost/ascend-edit-base:bookworm), WORK_DIR
# (/var/tmp/ascend-edit-verify), WHEELS_DIR (found through pip's find-links), SOURCE_REF (HEAD:
# the project snapshot installed into the image; the Dockerfile checked is the checkout's).
set -euo pipefail

cd "$(dirname "$0")/.."
WORK_DIR=${WORK_DIR:-/var/tmp/ascend-edit-verify}
BASE_IMAGE=${BASE_IMAGE:-localhost/ascend-edit-base:bookworm}
STANDIN_IMAGE=localhost/ascend-edit-cann-standin:9.2.0
IMAGE=${IMAGE:-localhost/ascend-edit:npu-standin}
SOURCE_REF=${SOURCE_REF:-HEAD}
CANN_VERSION=$(sed -n 's/^ARG CANN_VERSION=//p' docker/npu.Dockerfile)
NICE=(nice -n 19)
PODMAN=(podman --cgroup-manager=cgroupfs --runtime=runc)
# Same lowered limits as docker/verify-cpu.sh (the sandbox refuses podman's defaults).
lowered() {
    local hard; hard=$(ulimit -H "$1"); [ "$hard" = unlimited ] && hard=32768
    echo $((hard / 2 < 16384 ? hard / 2 : 16384))
}
ULIMITS=(--ulimit "nofile=$(lowered -n):$(lowered -n)" --ulimit "nproc=$(lowered -u):$(lowered -u)")
step() { printf '\n== [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }
die() { echo "build-npu-standin: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (podman's chroot isolation needs it)"
"${PODMAN[@]}" image exists "$BASE_IMAGE" || die "no $BASE_IMAGE: run docker/verify-cpu.sh first"
if [ -z "${WHEELS_DIR:-}" ]; then
    for dir in $(pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p") ${PIP_FIND_LINKS:-}; do
        if compgen -G "$dir/torch-2.13.0+cpu-*.whl" >/dev/null; then WHEELS_DIR=$dir; break; fi
    done
fi
[ -n "${WHEELS_DIR:-}" ] || die "no torch-2.13.0+cpu wheel found: set WHEELS_DIR to a directory holding one"

step "project snapshot: $SOURCE_REF"
commit=$(git rev-parse --verify "$SOURCE_REF^{commit}") || die "SOURCE_REF=$SOURCE_REF is not a commit"
git log -1 --format='%H %s' "$commit"
mkdir -p "$WORK_DIR" && touch "$WORK_DIR/.made-by-verify-cpu"
scratch=$(mktemp -d "$WORK_DIR/npu.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/context" "$scratch/standin"
git archive --format=tar "$commit" | tar -x -C "$scratch/context"

build() {  # build <base image> <log>: docker/npu.Dockerfile of the checkout, the snapshot as context
    # --format docker: podman's default OCI format ignores SHELL, also for RUN steps, which would
    # then run under /bin/sh instead of the Dockerfile's bash -o pipefail.
    "${NICE[@]}" "${PODMAN[@]}" build --format docker --isolation=chroot "${ULIMITS[@]}" --network=host \
        -f docker/npu.Dockerfile --ignorefile docker/npu.Dockerfile.dockerignore -t "$IMAGE" \
        --label org.opencontainers.image.revision="$commit" \
        --build-arg BASE_IMAGE="$1" \
        --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
        --build-arg MINDSPEED_REF="" \
        --build-arg TORCH_FIND_LINKS=/wheels -v "$WHEELS_DIR:/wheels:ro" \
        "$scratch/context" 2>&1 | tee "$2"
    return "${PIPESTATUS[0]}"
}

step "1. $BASE_IMAGE (no CANN): the build must refuse it"
if build "$BASE_IMAGE" "$WORK_DIR/npu-no-cann.log"; then
    die "the build accepted a base without CANN $CANN_VERSION"
fi
grep -q "base image does not hold CANN $CANN_VERSION" "$WORK_DIR/npu-no-cann.log" \
    || die "the build failed, but not at the CANN check (log: $WORK_DIR/npu-no-cann.log)"
echo "refused at the CANN check, as it should be"

step "2. stand-in base $STANDIN_IMAGE (version file only, NO CANN libraries)"
cat >"$scratch/standin/Containerfile" <<EOF
FROM $BASE_IMAGE
LABEL description="STAND-IN for a CANN base: a version file and an empty set_env.sh, no CANN"
RUN mkdir -p /usr/local/Ascend/ascend-toolkit/latest \\
    && echo "version=$CANN_VERSION  # STAND-IN, not a CANN install" \\
        >/usr/local/Ascend/ascend-toolkit/latest/version.cfg \\
    && echo 'echo "set_env.sh: STAND-IN, no CANN in this image" >&2' \\
        >/usr/local/Ascend/ascend-toolkit/set_env.sh
EOF
"${NICE[@]}" "${PODMAN[@]}" build --isolation=chroot "${ULIMITS[@]}" -t "$STANDIN_IMAGE" \
    "$scratch/standin" >/dev/null

step "3. $IMAGE on the stand-in base"
build "$STANDIN_IMAGE" "$WORK_DIR/npu-standin.log" || die "build failed (log: $WORK_DIR/npu-standin.log)"

step "4. the image's entrypoint runs a command"
# torch_npu registers itself for torch's backend autoload and needs CANN to import: off here.
"${PODMAN[@]}" run --rm "${ULIMITS[@]}" -e TORCH_DEVICE_BACKEND_AUTOLOAD=0 "$IMAGE" python -c \
    "import importlib.metadata as m; print({p: m.version(p) for p in ('torch', 'torch_npu', 'ascend_edit')})"

step "done ($(date -u '+%Y-%m-%d %H:%M UTC'), commit ${commit:0:12})"
