#!/usr/bin/env bash
# Build the CPU image and run the test suite inside it, end to end, on a machine without a Docker
# engine: Debian's podman with chroot isolation and runc, a base image made locally from a
# debootstrap root filesystem (pulling base images is not possible there), the torch CPU wheel
# already on this machine's disk mounted into the build. Prints the test summary.
#
# The build context is a snapshot of a commit (`git archive`, HEAD by default), not the working
# tree: the result is reproducible and names the commit it tested, and uncommitted edits in the
# checkout (work in progress) do not end up in the image.
#
#   docker/verify-cpu.sh                 # run as root
#   REBUILD_BASE=1 docker/verify-cpu.sh  # rebuild the base image too
#
# Environment (all optional):
#   WORK_DIR       scratch for the root filesystem          (default /var/tmp/ascend-edit-verify)
#   BASE_IMAGE     name of the local base image              (default localhost/ascend-edit-base:bookworm)
#   IMAGE          name of the built image                   (default localhost/ascend-edit:cpu)
#   DEBIAN_MIRROR  debootstrap mirror                         (default http://deb.debian.org/debian)
#   WHEELS_DIR     directory holding torch-2.13.0+cpu-*.whl  (default: found via pip's find-links)
#   PYTEST_ARGS    what the suite runs with                   (default: -m "not slow" -q)
#   SOURCE_REF     the commit the image is built from         (default HEAD)
set -euo pipefail

cd "$(dirname "$0")/.."
WORK_DIR=${WORK_DIR:-/var/tmp/ascend-edit-verify}
BASE_IMAGE=${BASE_IMAGE:-localhost/ascend-edit-base:bookworm}
IMAGE=${IMAGE:-localhost/ascend-edit:cpu}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTEST_ARGS=${PYTEST_ARGS:-}
SOURCE_REF=${SOURCE_REF:-HEAD}
[ -n "$PYTEST_ARGS" ] || PYTEST_ARGS='-m "not slow" -q'
# The 2-core machines are shared: builds and tests run at the lowest priority.
NICE=(nice -n 19)
# No systemd and no cgroup delegation here: cgroupfs; runc is the runtime Debian's podman works with.
PODMAN=(podman --cgroup-manager=cgroupfs --runtime=runc)
# podman asks runc for its default open-files and process limits, which this machine's sandbox
# refuses ("error setting rlimit ... operation not permitted"): ask for at most half of our own
# hard limits, and at most 16384 (48182 processes, half of this machine's limit, was refused too).
lowered() {
    local hard; hard=$(ulimit -H "$1"); [ "$hard" = unlimited ] && hard=32768
    echo $((hard / 2 < 16384 ? hard / 2 : 16384))
}
ULIMITS=(--ulimit "nofile=$(lowered -n):$(lowered -n)" --ulimit "nproc=$(lowered -u):$(lowered -u)")

step() { printf '\n== [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }
die() { echo "verify-cpu: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and podman's chroot isolation need it)"

step "tools"
missing=()
for tool in podman debootstrap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (+ fuse-overlayfs) with apt-get"
    apt-get install -y --no-install-recommends podman debootstrap runc fuse-overlayfs uidmap >/dev/null
fi
podman --version

step "torch CPU wheel"
if [ -z "${WHEELS_DIR:-}" ]; then
    # pip's own configuration says where this machine keeps local wheels (find-links).
    for dir in $(pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p") ${PIP_FIND_LINKS:-}; do
        if compgen -G "$dir/torch-2.13.0+cpu-*.whl" >/dev/null; then WHEELS_DIR=$dir; break; fi
    done
fi
[ -n "${WHEELS_DIR:-}" ] || die "no torch-2.13.0+cpu wheel found: set WHEELS_DIR to a directory holding one"
ls "$WHEELS_DIR"/torch-2.13.0+cpu-*.whl

# python3-dev: the headers C++ extensions build against (DeepSpeed's ops), as python:3.11-slim has them.
step "base image $BASE_IMAGE (Debian bookworm, Python 3.11 in /opt/venv)"
if [ -n "${REBUILD_BASE:-}" ] || ! "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    rootfs=$WORK_DIR/rootfs
    if [ -d "$rootfs" ]; then
        [ -f "$WORK_DIR/.made-by-verify-cpu" ] || die "$rootfs exists and was not made by this script"
        rm -rf "$rootfs"
    fi
    mkdir -p "$WORK_DIR" && touch "$WORK_DIR/.made-by-verify-cpu"
    "${NICE[@]}" debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$WORK_DIR/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK_DIR/debootstrap.log"; die "debootstrap failed (log: $WORK_DIR/debootstrap.log)"; }
    # Debian's Python refuses system-wide pip installs (PEP 668); a venv on PATH behaves like the
    # python:3.11-slim image the Dockerfile defaults to.
    chroot "$rootfs" python3 -m venv /opt/venv
    # Trust what this machine trusts: outbound HTTPS here may pass a TLS-inspecting proxy whose CA
    # is only in the host's bundle.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "${PODMAN[@]}" import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
fi
"${PODMAN[@]}" run --rm --network=host "${ULIMITS[@]}" "$BASE_IMAGE" python --version

step "source snapshot: $SOURCE_REF"
commit=$(git rev-parse --verify "$SOURCE_REF^{commit}") || die "SOURCE_REF=$SOURCE_REF is not a commit"
git log -1 --format='%H %cd %s' --date=iso-strict "$commit"
changed=$(git status --porcelain --untracked-files=no | wc -l)
[ "$changed" = 0 ] || echo "note: $changed tracked file(s) differ from the working tree's HEAD; only the commit is built"
mkdir -p "$WORK_DIR" && touch "$WORK_DIR/.made-by-verify-cpu"
# A fresh directory of this run's own, removed when the script exits.
context=$(mktemp -d "$WORK_DIR/context.XXXXXX")
trap 'rm -rf "$context"' EXIT
git archive --format=tar "$commit" | tar -x -C "$context"

step "image $IMAGE from docker/cpu.Dockerfile at ${commit:0:12}"
# The wheel directory is mounted for RUN steps only (no layer holds it); pip's index is PyPI, which
# this machine reaches, while download.pytorch.org (the Dockerfile's default torch index) is not.
"${NICE[@]}" "${PODMAN[@]}" build --isolation=chroot "${ULIMITS[@]}" --network=host \
    -f "$context/docker/cpu.Dockerfile" --ignorefile "$context/docker/cpu.Dockerfile.dockerignore" \
    -t "$IMAGE" --label org.opencontainers.image.revision="$commit" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
    --build-arg TORCH_FIND_LINKS=/wheels -v "$WHEELS_DIR:/wheels:ro" \
    "$context"

step "tests inside $IMAGE: pip install -e '.[test]' && python -m pytest $PYTEST_ARGS"
log=$WORK_DIR/pytest.log
mkdir -p "$WORK_DIR"
set +e
"${NICE[@]}" "${PODMAN[@]}" run --rm --network=host "${ULIMITS[@]}" "$IMAGE" \
    bash -c "pip install -q -e '.[test]' && python -m pytest $PYTEST_ARGS" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

step "summary ($(date -u '+%Y-%m-%d %H:%M UTC'), commit ${commit:0:12}, exit $status)"
grep -E '^(FAILED|ERROR) ' "$log" || true
tail -n 1 "$log"
exit "$status"
