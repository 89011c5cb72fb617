#!/usr/bin/env bash
# kpipe's main job, end to end, on a local lab of real Debian kernels under qemu:
# set up the machine, build the kbuild example on the `local` build host, validate,
# sign with a generated lab key, preflight in a VM, roll out in waves over three lab
# VMs, verify, audit (table + HTML), roll back, audit again; then a cumulative upgrade of a patch
# stream (v1, v2, rollback to v1). Leaves no VM running.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ "${KPIPE_SKIP_SETUP:-0}" != 1 ]; then
  echo "==> [setup] installing Debian and PyPI packages (scripts/setup.sh)"
  bash scripts/setup.sh
fi

export KPIPE_WORKSPACE="$ROOT"
REPORTS="$ROOT/.kpipe/reports"
mkdir -p "$REPORTS"
stage() { printf '\n\033[1m==> [%s] %s\033[0m\n' "$1" "$2"; }
json_field() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {"d": d}))' "$1"; }

cleanup() {
  stage cleanup "stopping the lab VMs"
  kpipe lab down || true
}
trap cleanup EXIT

RELEASE=$(kpipe kernels list --json | python3 -c '
import json, re, sys
# the plain amd64 flavour (not rt or cloud) of Debian 12, newest ABI by number
ks = [k["release"] for k in json.load(sys.stdin) if re.fullmatch(r"6\.1\.0-[0-9]+-amd64", k["release"])]
print(max(ks, key=lambda r: int(r.split("-")[1])))')
stage kernel "target kernel: $RELEASE (Debian's current 6.1 ABI, discovered from the installed headers)"

stage keys "lab signing key (kernel module-signing certificate, stays on this machine)"
KEYDIR="$ROOT/.lab/signing"
if [ ! -s "$KEYDIR/signing_key.pem" ]; then
  kpipe keys generate --signer lab --cn "kpipe lab module signing key"
fi
echo "certificate: $KEYDIR/signing_cert.pem"

stage recipe "lint the recipes, render cmdline-demo for $RELEASE"
kpipe recipe lint
kpipe recipe render cmdline-demo --kernel "$RELEASE"

stage build "build cmdline-demo on the local build host (validated and signed as the recipe says)"
kpipe build --recipe cmdline-demo --kernel "$RELEASE" --host local
ARTIFACT=$(kpipe artifacts list --recipe cmdline-demo --kernel "$RELEASE" --json \
  | python3 -c 'import json,sys; a=[x for x in json.load(sys.stdin) if x["status"]=="valid" and x["signed"]]; print(a[0]["id"])')
echo "signed artifact: $ARTIFACT"

stage validate "validate the signed module for $RELEASE (certificate: the lab key)"
kpipe validate "$ARTIFACT" --kernel "$RELEASE" --cert "$KEYDIR/signing_cert.pem"

stage preflight "boot $RELEASE in a VM: load, verify, probe, unload, verify removal"
kpipe preflight "$ARTIFACT"

stage lab "boot three lab VMs of $RELEASE"
kpipe lab up --kernel "$RELEASE" --vms 3
show_cmdline() {
  for vm in lab1 lab2 lab3; do
    printf '  %s /proc/cmdline: %s\n' "$vm" "$(kpipe lab ssh "$vm" -- cat /proc/cmdline)"
  done
}
echo "before the rollout:"; show_cmdline

stage rollout "roll out in waves (1 canary, then the rest), health-gated"
kpipe rollout start cmdline-demo --limit lab --waves 1,100% --max-failures 0 --rollback-policy wave --yes
echo "after the rollout:"; show_cmdline

stage verify "verify every host against the desired state"
kpipe verify --limit lab

stage audit "audit the fleet (table, HTML)"
kpipe audit --limit lab --format table
kpipe audit --limit lab --format html --output "$REPORTS/audit-after-rollout.html"
echo "HTML report: $REPORTS/audit-after-rollout.html"

stage cve "who is still exposed to the demo recipe's CVE? (nobody: exit 0)"
kpipe audit --limit lab --cve CVE-2099-0001

stage rollback "roll the patch back on every host"
kpipe rollout rollback last
echo "after the rollback:"; show_cmdline

stage audit "audit again"
kpipe audit --limit lab --format table
echo "exposed again after the rollback (exit 1 expected):"
if kpipe audit --limit lab --cve CVE-2099-0001; then echo "unexpected: no host exposed"; exit 1; fi
kpipe audit --limit lab --format html --output "$REPORTS/audit-after-rollback.html"
echo "HTML report: $REPORTS/audit-after-rollback.html"

stage streams "a cumulative upgrade: stream cmdline-stream v1, then v2 (klp replace), then the rollback"
# Two versions of one patch stream (recipes/cmdline-stream-v1.yaml, -v2.yaml), built like cmdline-demo;
# preflight was shown above, so these skip it. v2's rollout onto hosts running v1 loads v2, lets klp
# replace disable v1, then unloads v1; rolling that rollout back loads v1 again.
kpipe build --recipe cmdline-stream-v1 --kernel "$RELEASE" --host local
kpipe build --recipe cmdline-stream-v2 --kernel "$RELEASE" --host local
kpipe rollout start cmdline-stream-v1 --limit lab --waves 100% --skip-preflight --yes
echo "v1 loaded:"; show_cmdline
kpipe rollout plan cmdline-stream-v2 --limit lab --waves 100% --skip-preflight
kpipe rollout start cmdline-stream-v2 --limit lab --waves 100% --skip-preflight --yes
echo "after the upgrade (v1's module is gone):"; show_cmdline
echo "lab1: kpipe modules loaded, then livepatches in /sys/kernel/livepatch:"
kpipe lab ssh lab1 -- sh -c 'grep kpipe_ /proc/modules | cut -d " " -f 1; ls /sys/kernel/livepatch'
kpipe verify --limit lab
kpipe rollout rollback last --yes
echo "after rolling the upgrade back (v1 again):"; show_cmdline
kpipe verify --limit lab
STREAM_V1=$(kpipe rollout list --json | python3 -c '
import json, sys
print(next(r["id"] for r in json.load(sys.stdin) if r.get("target") == "cmdline-stream-v1"))')
kpipe rollout rollback "$STREAM_V1" --yes
echo "after rolling v1 back:"; show_cmdline

stage done "main job complete; reports in $REPORTS"
