#!/usr/bin/env bash
# Install the appliance on a factory PC and one systemd instance per project:
#     sudo systemd/install.sh projects/demo [projects/other ...]      (or: sudo make install-service PROJECT=...)
# then `systemctl enable --now appliance@demo`. What it does, in order:
#   1. the code, the firmware profiles and the pretrained store to /opt/appliance, with its own venv there;
#   2. each project exported (`appliance export`: its flow and the models it uses, copied) to
#      /var/lib/appliance/<name>, owned by the `appliance` user, which the unit runs as;
#   3. the unit to /etc/systemd/system/appliance@.service, and systemd reloaded.
# ROOT=/some/dir installs below that folder instead of / and skips the user, chown and systemctl steps (tests).
set -euo pipefail
source_dir="$(cd "$(dirname "$0")/.." && pwd)"
root="${ROOT:-}"
prefix="$root/opt/appliance"
state="$root/var/lib/appliance"
units="$root/etc/systemd/system"
[ $# -ge 1 ] || { echo "usage: $0 PROJECT_DIR [PROJECT_DIR ...]" >&2; exit 2; }
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    echo "run as root (sudo): it creates a user and writes /opt, /var/lib and /etc" >&2; exit 1
fi

echo "code -> $prefix"
mkdir -p "$prefix" "$state" "$units"
tar -C "$source_dir" --exclude=./.venv --exclude=./.git --exclude='./projects/*/logs' \
    --exclude='./projects/*/.cache' --exclude='*/__pycache__' -cf - . | tar -C "$prefix" -xf -
if [ -z "${APPLIANCE_VENV:-}" ]; then
    # A venv of its own at its final place (venvs cannot be moved), installed like `make install`.
    make -C "$prefix" --no-print-directory install models
    venv="$prefix/.venv"
else
    venv="$APPLIANCE_VENV"   # tests: an existing venv with the appliance installed
fi

if [ -z "$root" ] && ! id appliance >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/appliance --shell /usr/sbin/nologin --user-group appliance
    # The iGPU and NPU device nodes belong to the render group (RELIABILITY 14).
    if getent group render >/dev/null; then usermod -aG render appliance; fi
fi

for project in "$@"; do
    name="$(basename "$project")"
    if [ -e "$state/$name" ]; then
        echo "$state/$name exists: kept as it is (move it away to install the project again)"
        continue
    fi
    "$venv/bin/appliance" export "$project" "$state/$name"
    [ -n "$root" ] || chown -R appliance:appliance "$state/$name"
done

sed "s#/opt/appliance/.venv/bin/appliance#$venv/bin/appliance#" "$source_dir/systemd/appliance@.service" \
    > "$units/appliance@.service"
chmod 644 "$units/appliance@.service"
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
for project in "$@"; do
    echo "next: systemctl enable --now appliance@$(basename "$project")"
done
