#!/usr/bin/env bash
# Debian packages the tests use: ffmpeg (dataset preparation) and a one-node SLURM cluster
# (slurm/ scripts, preemption). Installed only when missing and when we may (root + apt-get);
# otherwise the tests that need them skip with a reason.
set -u
pkgs=()
command -v ffmpeg >/dev/null 2>&1 || pkgs+=(ffmpeg)
command -v slurmctld >/dev/null 2>&1 || pkgs+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || pkgs+=(slurmd)
command -v sbatch >/dev/null 2>&1 || pkgs+=(slurm-client)
command -v munged >/dev/null 2>&1 || pkgs+=(munge)
[ ${#pkgs[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "distres: not root or no apt-get; missing ${pkgs[*]} (tests that need them will skip)"
    exit 0
fi
echo "distres: installing ${pkgs[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; }; then
    echo "distres: apt-get install of ${pkgs[*]} failed (tests that need them will skip)"
fi
exit 0
