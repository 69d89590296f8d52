#!/usr/bin/env bash
# Container entrypoint for the NPU image: load the CANN environment, then run the command.
set -euo pipefail
# The set_env.sh scripts read unset variables, so -u is off while they run.
set +u
# CANN's scripts are in the image, not in this repository: nothing for shellcheck to follow.
# shellcheck source=/dev/null
source /usr/local/Ascend/ascend-toolkit/set_env.sh
# Optional parts of a CANN install: NNAL (ATB fused ops) and the BiSheng compiler that
# triton-ascend uses.
for extra in /usr/local/Ascend/nnal/atb/set_env.sh \
  /usr/local/Ascend/cann-*/share/info/ascendnpu-ir/bin/set_env.sh; do
  if [[ -f "$extra" ]]; then
    # shellcheck source=/dev/null
    source "$extra"
  fi
done
set -u
exec "$@"
