#!/usr/bin/env bash
# The real kpatch-build path, end to end (needs root): forge a small Debian 6.12 kernel, start the forge's
# trixie chroot as a kpatch-build build host on loopback, build the cmdline-kforge recipe there over SSH
# with Debian's kpatch-build, validate against the forged vmlinux, sign with the lab key, preflight with
# module.sig_enforce=1, boot two lab VMs of the forged kernel (sig_enforce=1), roll out in waves, verify,
# audit, roll back, stop everything. Caches (chroot, kernel, the kpatch-build tree) are reused: about
# 10 minutes from nothing on 2 idle cores plus the kernel build, a few minutes warm.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ "${KPIPE_SKIP_SETUP:-0}" != 1 ]; then
  echo "==> [setup] installing Debian and PyPI packages (scripts/setup.sh)"
  bash scripts/setup.sh
fi

# A workspace of its own (the repository's kpipe.toml stays as it is).
WS="${KPIPE_KPATCH_JOB_WS:-$ROOT/.lab/kpatch-job}"
SOURCE="${KPIPE_FORGE_SOURCE:-debian:trixie/6.12}"
RECIPE=cmdline-kforge
mkdir -p "$WS/recipes" "$WS/patches"
cp recipes/$RECIPE.yaml "$WS/recipes/"
cp patches/$RECIPE.patch "$WS/patches/"
# the build host's entry is added below, once its port and keys are known
[ -f "$WS/kpipe.toml" ] || printf '[workspace]\n' >"$WS/kpipe.toml"
export KPIPE_WORKSPACE="$WS"
stage() { printf '\n\033[1m==> [%s] %s\033[0m\n' "$1" "$2"; }
field() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {"d": d}))' "$1"; }
elapsed() { echo "($(( $(date +%s) - $1 )) s)"; }

cleanup() {
  stage down "stopping the lab VMs and the build host"
  kpipe lab down || true
  kpipe lab buildhost down || true
}
trap cleanup EXIT

stage forge "kpipe lab forge --source $SOURCE (a cache hit after the first run)"
t=$(date +%s)
FORGED=$(kpipe lab forge --source "$SOURCE" --json)
RELEASE=$(echo "$FORGED" | field 'd["release"]')
CERT=$(echo "$FORGED" | field 'd["trusted_cert"]')
echo "forged kernel: $RELEASE $(elapsed "$t")"
echo "  vmlinux $(echo "$FORGED" | field 'd["vmlinux"]')"
echo "  it trusts $CERT"

stage buildhost "kpipe lab buildhost up: the trixie chroot's sshd on a loopback port (Debian's kpatch-build)"
kpipe lab buildhost down >/dev/null || true   # a build host left by an interrupted run
BH=$(kpipe lab buildhost up --json)
PORT=$(echo "$BH" | field 'd["port"]')
KNOWN=$(echo "$BH" | field 'd["known_hosts"]')
IDENT=$(echo "$BH" | field 'd["identity_file"]')
KEY=$(python3 -c 'from kpipe.lab.forge import ensure_lab_key; print(ensure_lab_key()[0])')
LABCERT=$(python3 -c 'from kpipe.lab.forge import ensure_lab_key; print(ensure_lab_key()[1])')
cat >"$WS/kpipe.toml" <<EOF
# written by scripts/kpatch-job.sh
[workspace]

[ssh]
known_hosts = "$KNOWN"
accept_new_host_keys = false

[[build_hosts]]
name = "forge-trixie"
address = "127.0.0.1"
port = $PORT
user = "root"
arch = "x86_64"
kernels = ["*-kforge-*"]
identity_file = "$IDENT"
workdir = "/root/kpipe-builds"

[signing]
default = "lab"

[signing.signers.lab]
type = "builtin"
key = "$KEY"
cert = "$LABCERT"
hash = "sha256"
EOF
echo "build host forge-trixie: root@127.0.0.1:$PORT, strict known_hosts $KNOWN"

stage build "kpipe build --recipe $RECIPE --kernel $RELEASE --host forge-trixie (the real kpatch-build, over SSH)"
t=$(date +%s)
BUILT=$(kpipe build --recipe $RECIPE --kernel "$RELEASE" --host forge-trixie --json)
ARTIFACT=$(echo "$BUILT" | field 'd[0]["artifact_id"]')
echo "built: artifact $ARTIFACT, module $(echo "$BUILT" | field 'd[0]["module_name"]') $(elapsed "$t")"
kpipe artifacts log "$ARTIFACT" | grep -E '^(Using source|Testing|Building|Extracting|.*changed function|Patched|SUCCESS|kpipe: )' || true

stage validate "kpipe validate $ARTIFACT --kernel $RELEASE (symbols and klp relocations from the forged vmlinux)"
kpipe validate "$ARTIFACT" --kernel "$RELEASE"

stage sign "kpipe sign $ARTIFACT --signer lab (the key the forged kernel trusts), then validate the signature"
SIGNED=$(kpipe sign "$ARTIFACT" --signer lab --json | field 'd["id"]')
echo "signed artifact: $SIGNED"
kpipe validate "$SIGNED" --kernel "$RELEASE" --cert "$CERT"

stage preflight "kpipe preflight $SIGNED --sig-enforce: boot $RELEASE with module.sig_enforce=1, load, verify, probe, unload"
kpipe preflight "$SIGNED" --sig-enforce

stage lab "kpipe lab up --kernel $RELEASE --vms 2 --sig-enforce"
kpipe lab up --kernel "$RELEASE" --vms 2 --sig-enforce
show_cmdline() {
  for vm in lab1 lab2; do
    printf '  %s /proc/cmdline: %s\n' "$vm" "$(kpipe lab ssh "$vm" -- cat /proc/cmdline)"
  done
}
echo "before the rollout:"; show_cmdline

stage rollout "kpipe rollout start $RECIPE --limit lab --waves 1,100% (one canary, then the rest)"
kpipe rollout start $RECIPE --limit lab --waves 1,100% --max-failures 0 --rollback-policy wave --yes
echo "after the rollout:"; show_cmdline

stage verify "kpipe verify --limit lab"
kpipe verify --limit lab

stage audit "kpipe audit --limit lab"
kpipe audit --limit lab --format table --strict

stage rollback "kpipe rollout rollback last"
kpipe rollout rollback last --yes
echo "after the rollback:"; show_cmdline

stage done "the real kpatch-build path ran end to end on $RELEASE; workspace $WS"
