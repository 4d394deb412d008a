#!/usr/bin/env bash
# Install the Debian packages that tests/slurm/local_cluster.py needs for a one-node Slurm with accounting.
# Idempotent: exits at once when every package is already installed. Needs root (or passwordless sudo).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

fail() {
    echo "install-slurm: $*" >&2
    exit 1
}

missing=()
for package in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
    [[ "$status" == "installed" ]] || missing+=("$package")
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-slurm: already installed: ${PACKAGES[*]}"
    exit 0
fi

command -v apt-get >/dev/null || fail "apt-get not found; install ${missing[*]} with this system's package manager"

if [[ $(id -u) -eq 0 ]]; then
    as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    fail "must run as root (or with passwordless sudo) to install: ${missing[*]}"
fi

export DEBIAN_FRONTEND=noninteractive
apt_install() {
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"
}

has_candidates() {
    local package candidate
    for package in "${missing[@]}"; do
        candidate=$(apt-cache policy "$package" 2>/dev/null | awk '/Candidate:/ {print $2}')
        [[ -n "$candidate" && "$candidate" != "(none)" ]] || return 1
    done
}

updated=0
if ! has_candidates; then
    echo "install-slurm: package lists do not know ${missing[*]}; running apt-get update"
    "${as_root[@]}" apt-get update || fail "apt-get update failed"
    updated=1
fi

echo "install-slurm: installing ${missing[*]}"
# Stale lists can point at files the mirror no longer has: refresh once and retry before giving up.
if ! apt_install; then
    [[ $updated -eq 0 ]] || fail "apt-get install failed for: ${missing[*]}"
    echo "install-slurm: install failed with the current package lists; running apt-get update once" >&2
    "${as_root[@]}" apt-get update || fail "apt-get update failed"
    apt_install || fail "apt-get install failed for: ${missing[*]}"
fi

for package in "${missing[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
    [[ "$status" == "installed" ]] || fail "$package is still not installed (dpkg status: ${status:-unknown})"
done
echo "install-slurm: installed ${missing[*]}"
