#!/usr/bin/env bash
# The mixed-arch job, end to end (needs root): one kbuild recipe built for the forged x86_64 6.12 kernel (on the
# trixie forge chroot's sshd) and for the forged arm64 7.2 kernel (cross-built on the sid forge chroot's sshd,
# ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-), validated against each forged vmlinux, signed with the lab key,
# preflighted with module.sig_enforce=1 (the arm64 one on qemu-system-aarch64), then rolled out in waves over one
# lab holding an x86_64 and an aarch64 VM (sig_enforce on both), verified, audited, rolled back, audited again;
# the VMs and both build hosts are stopped at the end. Every cache is reused: a few minutes warm. Cold, the two
# kernel forges take long (the arm64 cross build about an hour on 2 busy cores); see docs/forge.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ "${KPIPE_SKIP_SETUP:-0}" != 1 ]; then
  echo "==> [setup] installing Debian and PyPI packages (scripts/setup.sh)"
  bash scripts/setup.sh
fi

# A workspace of its own (the repository's kpipe.toml stays as it is).
WS="${KPIPE_MIXED_JOB_WS:-$ROOT/.lab/mixed-arch-job}"
X86_SOURCE="${KPIPE_FORGE_SOURCE:-debian:trixie/6.12}"
ARM_SOURCE="${KPIPE_ARM64_FORGE_SOURCE:-debian:sid/7.2}"
RECIPE=cmdline-arm64
MESSAGE="kpipe arm64 live patch active"
mkdir -p "$WS/recipes"
cp -r recipes/templates "$WS/recipes/"
[ -f "$WS/kpipe.toml" ] || printf '[workspace]\n' >"$WS/kpipe.toml"
export KPIPE_WORKSPACE="$WS"
TRIXIE_BH="$WS/.lab/buildhost-trixie"
SID_BH="$WS/.lab/buildhost-sid"
JOB_START=$(date +%s)
TIMES=()
stage() { printf '\n\033[1m==> [%s] %s\033[0m\n' "$1" "$2"; STAGE=$1; STAGE_START=$(date +%s); }
stage_end() { TIMES+=("$STAGE $(( $(date +%s) - STAGE_START )) s"); }
field() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {"d": d}))' "$1"; }

cleanup() {
  stage down "stopping the lab VMs and both build hosts"
  kpipe lab down || true
  kpipe lab buildhost down --folder "$TRIXIE_BH" || true
  kpipe lab buildhost down --folder "$SID_BH" || true
}
trap cleanup EXIT

forged_ready() {  # whether a forged kernel of this source and arch is cached (then `lab forge` is a cache hit)
  python3 -c '
import sys
from kpipe.forged import forged_kernels
sys.exit(0 if any(k.source == sys.argv[1] and k.arch == sys.argv[2] for k in forged_kernels()) else 1)' "$1" "$2"
}

stage forge "the forged kernels: x86_64 ($X86_SOURCE) and aarch64 ($ARM_SOURCE), cache hits after the first run"
forged_ready "$X86_SOURCE" x86_64 ||
  echo "no forged x86_64 ${X86_SOURCE##*/} kernel cached: forging it now (a kernel build: tens of minutes)"
X86=$(kpipe lab forge --source "$X86_SOURCE" --json)
forged_ready "$ARM_SOURCE" aarch64 ||
  echo "no forged arm64 ${ARM_SOURCE##*/} kernel cached: forging it now (a cross kernel build: about an hour)"
ARM=$(kpipe lab forge --source "$ARM_SOURCE" --arch aarch64 --json)
X86_REL=$(echo "$X86" | field 'd["release"]')
ARM_REL=$(echo "$ARM" | field 'd["release"]')
X86_VMLINUX=$(echo "$X86" | field 'd["vmlinux"]')
ARM_VMLINUX=$(echo "$ARM" | field 'd["vmlinux"]')
CERT=$(echo "$ARM" | field 'd["trusted_cert"]')  # both forges trust the same lab certificate
echo "x86_64:  $X86_REL"
echo "aarch64: $ARM_REL"
stage_end

stage buildhosts "two build hosts on loopback: the trixie chroot (x86_64) and the sid chroot with the arm64 cross gcc"
kpipe lab buildhost down --folder "$TRIXIE_BH" >/dev/null || true   # left by an interrupted run
kpipe lab buildhost down --folder "$SID_BH" >/dev/null || true
SUITE=${X86_SOURCE#*:}
TRIXIE=$(kpipe lab buildhost up --suite "${SUITE%%/*}" --version "${X86_SOURCE##*/}" --folder "$TRIXIE_BH" --json)
# the CLI's build host has no cross gcc: the sid chroot with gcc-aarch64-linux-gnu comes from the library
SID=$(python3 - "$SID_BH" "$ARM_SOURCE" <<'EOF'
import json, sys
from pathlib import Path
from kpipe.lab.buildhost import BuildHostChroot
suite, version = sys.argv[2].split(":", 1)[1].split("/")
state = BuildHostChroot(Path(sys.argv[1])).up(suite, version=version,
                                              packages=(f"linux-source-{version}", "gcc-aarch64-linux-gnu"))
print(json.dumps(state))
EOF
)
cat "$(echo "$TRIXIE" | field 'd["known_hosts"]')" "$(echo "$SID" | field 'd["known_hosts"]')" >"$WS/known_hosts"
KEY=$(python3 -c 'from kpipe.lab.forge import ensure_lab_key; print(ensure_lab_key()[0])')
LABCERT=$(python3 -c 'from kpipe.lab.forge import ensure_lab_key; print(ensure_lab_key()[1])')
cat >"$WS/kpipe.toml" <<EOF
# written by scripts/mixed-arch-job.sh
[workspace]

[ssh]
known_hosts = "$WS/known_hosts"
accept_new_host_keys = false

[[build_hosts]]
name = "forge-trixie"
address = "127.0.0.1"
port = $(echo "$TRIXIE" | field 'd["port"]')
user = "root"
arch = "x86_64"
kernels = ["${X86_SOURCE##*/}.*-kforge-*"]
identity_file = "$(echo "$TRIXIE" | field 'd["identity_file"]')"
workdir = "/root/kpipe-builds"

[[build_hosts]]
name = "forge-sid"
address = "127.0.0.1"
port = $(echo "$SID" | field 'd["port"]')
user = "root"
arch = "x86_64"
cross_arches = ["aarch64"]
kernels = ["${ARM_SOURCE##*/}.*-kforge-*"]
identity_file = "$(echo "$SID" | field 'd["identity_file"]')"
workdir = "/root/kpipe-builds"

[signing]
default = "lab"

[signing.signers.lab]
type = "builtin"
key = "$KEY"
cert = "$LABCERT"
hash = "sha256"
EOF
cat >"$WS/recipes/$RECIPE.yaml" <<EOF
# written by scripts/mixed-arch-job.sh: one kbuild live patch for forged kernels of either arch
name: $RECIPE
description: "mixed-arch demo live patch: /proc/cmdline prints a message on {{ kernel.release }}"
builder: kbuild
kernels:
  - "*-kforge-*"
options:
  message: "$MESSAGE\\n"
kbuild:
  module_name: livepatch-cmdline-arm64
  sources:
    - template: templates/livepatch-cmdline.c.j2
      name: livepatch-cmdline-arm64.c
  kbuild: templates/Kbuild.j2
signing:
  sign: false
rollout:
  waves: [1, "100%"]
  max_failures: 0
  soak: 2s
  rollback: wave
  probe:
    argv: [cat, /proc/cmdline]
    expect: "^$MESSAGE\$"
    expect_after_rollback: "console="
EOF
echo "build hosts: forge-trixie (6.12, native) and forge-sid (7.2, cross_arches aarch64), strict known_hosts"
stage_end

declare -A ART SIGNED
stage build "kpipe build --recipe $RECIPE for both kernels (the planner picks each kernel's host)"
for rel in "$X86_REL" "$ARM_REL"; do
  BUILT=$(kpipe build --recipe $RECIPE --kernel "$rel" --json)
  ART[$rel]=$(echo "$BUILT" | field 'd[0]["artifact_id"]')
  echo "$rel: artifact ${ART[$rel]} built on $(echo "$BUILT" | field 'd[0]["host"]')"
done
stage_end

stage validate "kpipe validate: machine, vermagic, relocation types, livepatch symbols (each forged vmlinux)"
kpipe validate "${ART[$X86_REL]}" --kernel "$X86_REL" --symbols "$X86_VMLINUX"
kpipe validate "${ART[$ARM_REL]}" --kernel "$ARM_REL" --symbols "$ARM_VMLINUX"
stage_end

stage sign "kpipe sign --signer lab (the key both forged kernels trust), then validate the signatures"
for rel in "$X86_REL" "$ARM_REL"; do
  SIGNED[$rel]=$(kpipe sign "${ART[$rel]}" --signer lab --json | field 'd["id"]')
  kpipe validate "${SIGNED[$rel]}" --kernel "$rel" --cert "$CERT"
done
stage_end

stage preflight "kpipe preflight --sig-enforce: a VM of each kernel with module.sig_enforce=1 (load, verify, unload)"
for rel in "$ARM_REL" "$X86_REL"; do
  kpipe preflight "${SIGNED[$rel]}" --sig-enforce --no-progress
done
stage_end

stage lab "kpipe lab up --kernel $X86_REL --vms 1 --group $ARM_REL:1 --sig-enforce (one lab, both arches)"
kpipe lab up --kernel "$X86_REL" --vms 1 --group "$ARM_REL:1" --sig-enforce --no-progress
show() {
  for vm in lab1 lab2; do
    printf '  %s %s: %s\n' "$vm" "$(kpipe lab ssh "$vm" -- uname -m)" "$(kpipe lab ssh "$vm" -- cat /proc/cmdline)"
  done
}
echo "before the rollout:"; show
stage_end

stage rollout "kpipe rollout start $RECIPE --limit lab --waves 1,100% (each host gets its arch's module)"
kpipe rollout start $RECIPE --limit lab --waves 1,100% --max-failures 0 --rollback-policy wave --yes
echo "after the rollout:"; show
stage_end

stage verify "kpipe verify --limit lab"
kpipe verify --limit lab
stage_end

stage audit "kpipe audit --limit lab (both hosts compliant)"
kpipe audit --limit lab --format table --strict
stage_end

stage rollback "kpipe rollout rollback last"
kpipe rollout rollback last --yes
echo "after the rollback:"; show
stage_end

stage audit-again "kpipe audit --limit lab (the patch is gone from both)"
kpipe audit --limit lab --format table
stage_end

stage done "the mixed-arch job ran end to end; workspace $WS"
printf '  %s\n' "${TIMES[@]}"
echo "  total $(( $(date +%s) - JOB_START )) s (the VMs and build hosts are stopped next)"
