#!/usr/bin/env bash
# Install (or upgrade) the bench triage appliance as a systemd service on a Debian bench PC.
#
#   sudo systemd/install.sh                  install or upgrade, enable and (re)start the service
#   sudo systemd/install.sh --no-start       install or upgrade and enable, but do not start it
#   sudo systemd/install.sh --uninstall      stop, disable, remove unit, udev rule and /opt/appliance
#   sudo systemd/install.sh --uninstall --purge   ... and also /var/lib/appliance, /etc/appliance, the user
#
# Environment (all optional):
#   SCANNER_VENDOR_ID, SCANNER_PRODUCT_ID  USB ids (4 hex digits) of the scanner's serial adapter, see
#                                          `lsusb`; default: the ids of an existing install, else FTDI 0403:6001
#   SCANNER_SERIAL                         also match this USB serial number (when two such adapters are plugged)
#   PYTHON                                 the Python 3.11 to build the venv with (default python3)
#
# Rerunning it is an upgrade: the venv and model are replaced, the unit and rule rewritten; the settings
# file, the API token and the data in /var/lib/appliance are kept.
set -euo pipefail

PREFIX=/opt/appliance
VENV=$PREFIX/venv
MODEL_NAME=idc-resnet
CONF_DIR=/etc/appliance
CONF=$CONF_DIR/appliance.toml
DATA_DIR=/var/lib/appliance
UNIT_DIR=/etc/systemd/system
UNIT=appliance.service
RULE=/etc/udev/rules.d/99-appliance-scanner.rules
BIN_LINK=/usr/local/bin/appliance
SERVICE_USER=appliance
PYTHON=${PYTHON:-python3}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$(cd "$HERE/.." && pwd)

say() { printf '==> %s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

START=yes
ACTION=install
PURGE=no
for arg in "$@"; do
    case $arg in
        --no-start) START=no ;;
        --uninstall) ACTION=uninstall ;;
        --purge) PURGE=yes ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $arg" ;;
    esac
done
[[ $PURGE == yes && $ACTION != uninstall ]] && die "--purge only goes with --uninstall"

[[ $(id -u) -eq 0 ]] || die "must run as root (try: sudo $0 $*)"
command -v systemctl >/dev/null || die "systemctl not found: this installs a systemd service"

have_systemd() { [[ -d /run/systemd/system ]]; }  # false in a chroot or image build: then only files are installed

uninstall() {
    if have_systemd; then
        say "stopping and disabling $UNIT"
        systemctl disable --now "$UNIT" 2>/dev/null || true
    fi
    rm -f "$UNIT_DIR/$UNIT"
    rm -f "$RULE"
    if [[ -L $BIN_LINK && $(readlink "$BIN_LINK") == "$VENV/bin/appliance" ]]; then rm -f "$BIN_LINK"; fi
    rm -rf "$PREFIX"
    if have_systemd; then
        systemctl daemon-reload
        systemctl reset-failed "$UNIT" 2>/dev/null || true
    fi
    if command -v udevadm >/dev/null; then udevadm control --reload-rules 2>/dev/null || true; fi
    if [[ $PURGE == yes ]]; then
        say "purging $DATA_DIR, $CONF_DIR and the user $SERVICE_USER"
        rm -rf "$DATA_DIR" "$CONF_DIR"
        if getent passwd "$SERVICE_USER" >/dev/null; then userdel "$SERVICE_USER"; fi
        if getent group "$SERVICE_USER" >/dev/null; then groupdel "$SERVICE_USER"; fi
    else
        say "kept the data in $DATA_DIR and the settings in $CONF_DIR (remove them with --uninstall --purge)"
    fi
    say "uninstalled"
}

if [[ $ACTION == uninstall ]]; then
    uninstall
    exit 0
fi

# --- checks before anything changes ---
[[ -f $SRC/pyproject.toml && -d $SRC/appliance && -f $SRC/models/$MODEL_NAME/manifest.json ]] \
    || die "run this from the appliance source tree (no pyproject.toml, appliance/ or models/$MODEL_NAME/ under $SRC)"
[[ -f $HERE/$UNIT && -f $HERE/99-appliance-scanner.rules ]] || die "$HERE lacks $UNIT or 99-appliance-scanner.rules"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (Debian: apt-get install python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 12)))' \
    || die "the appliance needs Python 3.11; $PYTHON is $("$PYTHON" -V 2>&1)"
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    if command -v apt-get >/dev/null; then
        say "installing python3-venv"
        DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv >/dev/null
    else
        die "$PYTHON cannot make a venv (Debian: apt-get install python3-venv)"
    fi
fi

# USB ids: explicit > those of the installed rule (an upgrade keeps them) > FTDI FT232R.
installed_id() { [[ -f $RULE ]] && sed -n "s/.*ATTRS{$1}==\"\([0-9a-fA-F]\{4\}\)\".*/\1/p" "$RULE" | head -n1; }
VENDOR=${SCANNER_VENDOR_ID:-$(installed_id idVendor || true)}
VENDOR=${VENDOR:-0403}
PRODUCT=${SCANNER_PRODUCT_ID:-$(installed_id idProduct || true)}
PRODUCT=${PRODUCT:-6001}
VENDOR=${VENDOR,,}
PRODUCT=${PRODUCT,,}
[[ $VENDOR =~ ^[0-9a-f]{4}$ ]] || die "SCANNER_VENDOR_ID must be 4 hex digits as lsusb shows them, not '$VENDOR'"
[[ $PRODUCT =~ ^[0-9a-f]{4}$ ]] || die "SCANNER_PRODUCT_ID must be 4 hex digits as lsusb shows them, not '$PRODUCT'"
SERIAL=${SCANNER_SERIAL:-}
[[ -z $SERIAL || $SERIAL =~ ^[A-Za-z0-9._-]+$ ]] || die "SCANNER_SERIAL may hold only letters, digits, . _ -"

# --- the service user: a system user without a login, in the serial-port group ---
getent group dialout >/dev/null || groupadd --system dialout
getent group "$SERVICE_USER" >/dev/null || groupadd --system "$SERVICE_USER"
if ! getent passwd "$SERVICE_USER" >/dev/null; then
    say "creating the system user $SERVICE_USER"
    useradd --system --gid "$SERVICE_USER" --groups dialout --home-dir "$DATA_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "bench triage appliance" "$SERVICE_USER"
fi
usermod --append --groups dialout "$SERVICE_USER"

# --- the venv: built beside the old one, swapped in only when complete and working ---
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"; rm -rf "$VENV.new" "$PREFIX/models/$MODEL_NAME.new"' EXIT
mkdir -p "$PREFIX" "$PREFIX/models"
chmod 0755 "$PREFIX" "$PREFIX/models"

say "building the appliance package"
# Only what the package is made of, copied out so the build writes nothing into the source tree.
tar -C "$SRC" --exclude=__pycache__ --exclude='*.pyc' --exclude='node_modules/.package-lock.json' \
    -cf - pyproject.toml README.md appliance firmware_bridge \
    | tar -C "$STAGE" -xf -
mkdir -p "$STAGE/src" && mv "$STAGE"/{pyproject.toml,README.md,appliance,firmware_bridge} "$STAGE/src/"
# the browser viewer's OpenSeadragon, from npm with its lockfile (if `make` has not installed it already)
VIEWER=$STAGE/src/appliance/api/viewer
if [ ! -e "$VIEWER/node_modules/openseadragon/build/openseadragon/openseadragon.min.js" ]; then
    command -v npm >/dev/null || die "npm is needed to install the viewer's OpenSeadragon (apt-get install npm)"
    (cd "$VIEWER" && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci for the viewer failed"
fi
rm -rf "$VENV.new"
"$PYTHON" -m venv "$VENV.new"
PIP=("$VENV.new/bin/python" -m pip --disable-pip-version-check --no-input)
"${PIP[@]}" install --quiet --upgrade pip
"${PIP[@]}" wheel --quiet --no-deps --wheel-dir "$STAGE/wheel" "$STAGE/src" >"$STAGE/build.log" 2>&1 \
    || { cat "$STAGE/build.log" >&2; die "building the appliance package failed"; }
WHEEL=$(ls "$STAGE"/wheel/bench_triage_appliance-*.whl)
say "installing $(basename "$WHEEL") and its runtime dependencies into $VENV"
"${PIP[@]}" install --quiet "$WHEEL"  # runtime dependencies only: no [dev] or [train] extras, not editable

# The venv must work where it will live, so it is built at $VENV.new and then moved: fix the paths pip wrote.
# (Scripts carry the interpreter path; pyvenv.cfg does not carry the venv's own path.)
grep -rlI --null -F "$VENV.new" "$VENV.new/bin" | xargs -0 -r sed -i "s#${VENV//./\\.}\\.new#$VENV#g"

# --- the model: copied, checked (manifest, sha256 of every file, loads in OpenVINO), then swapped in ---
MODEL_DST=$PREFIX/models/$MODEL_NAME
say "installing the model to $MODEL_DST"
rm -rf "$MODEL_DST.new"
mkdir -p "$MODEL_DST.new"
tar -C "$SRC/models/$MODEL_NAME" --exclude=work --exclude=__pycache__ -cf - . | tar -C "$MODEL_DST.new" -xf -
chmod -R u=rwX,go=rX "$MODEL_DST.new"
: >"$STAGE/empty.toml"  # defaults only: neither an old /etc/appliance/appliance.toml nor APPLIANCE_* apply
env -i PATH=/usr/bin:/bin HOME=/root "$VENV.new/bin/python" -m appliance.cli --config "$STAGE/empty.toml" models verify "$MODEL_DST.new" \
    >/dev/null 2>"$STAGE/verify.err" || { cat "$STAGE/verify.err" >&2; die "the model in $SRC/models/$MODEL_NAME does not verify"; }

# Stop the old service only now that the new build is known to work; then swap.
WAS_ACTIVE=no
if have_systemd && systemctl is-active --quiet "$UNIT" 2>/dev/null; then WAS_ACTIVE=yes; fi
if [[ $WAS_ACTIVE == yes ]]; then say "stopping $UNIT for the upgrade"; systemctl stop "$UNIT"; fi
rm -rf "$VENV.old" "$MODEL_DST.old"
[[ -d $VENV ]] && mv "$VENV" "$VENV.old"
mv "$VENV.new" "$VENV"
[[ -d $MODEL_DST ]] && mv "$MODEL_DST" "$MODEL_DST.old"
mv "$MODEL_DST.new" "$MODEL_DST"
rm -rf "$VENV.old" "$MODEL_DST.old"
"$VENV/bin/python" -c 'import appliance, firmware_bridge' || die "the installed venv does not import appliance"
install -m 0644 "$SRC/README.md" "$PREFIX/README.md"
ln -sfn "$VENV/bin/appliance" "$BIN_LINK"

# --- settings: written only if absent (an upgrade keeps the lab's settings) ---
install -d -m 0755 "$CONF_DIR"
if [[ ! -e $CONF ]]; then
    say "writing the default settings $CONF"
    umask 022
    cat >"$CONF.tmp" <<EOF
# Bench triage appliance settings (appliance/config.py; \`appliance config show\` prints the effective ones).
# Restart after a change: systemctl restart appliance
data_dir = "$DATA_DIR"
model_dir = "$MODEL_DST"
serial_port = "/dev/scanner"
api_host = "127.0.0.1"
api_port = 8470
EOF
    chmod 0644 "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
else
    say "keeping the existing settings $CONF"
fi
# The settings must load with the installed code (an unknown key from an old version is an error).
env -i PATH=/usr/bin:/bin HOME=/root "$VENV/bin/appliance" --config "$CONF" config show >/dev/null \
    || die "$CONF does not load with the installed appliance; fix it and rerun"

# --- data directory and API token (0600, owned by the service user; made once, kept on upgrade) ---
install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$DATA_DIR"
TOKEN=$(env -i PATH=/usr/bin:/bin HOME=/root "$VENV/bin/python" -c \
    'import sys; from pathlib import Path; from appliance.config import load_settings
print(load_settings(Path(sys.argv[1])).token_path)' "$CONF")
if [[ ! -e $TOKEN ]]; then
    say "making the API token $TOKEN"
    install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$(dirname "$TOKEN")"
    (umask 077; "$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$TOKEN.tmp")
    chown "$SERVICE_USER:$SERVICE_USER" "$TOKEN.tmp"
    chmod 0600 "$TOKEN.tmp"
    mv "$TOKEN.tmp" "$TOKEN"
else
    chown "$SERVICE_USER:$SERVICE_USER" "$TOKEN"
    chmod 0600 "$TOKEN"
fi

# --- unit and udev rule ---
say "installing $UNIT_DIR/$UNIT and $RULE (scanner USB id $VENDOR:$PRODUCT${SERIAL:+, serial $SERIAL})"
install -m 0644 "$HERE/$UNIT" "$UNIT_DIR/$UNIT"
sed -e "s/ATTRS{idVendor}==\"[0-9a-fA-F]\{4\}\"/ATTRS{idVendor}==\"$VENDOR\"/" \
    -e "s/ATTRS{idProduct}==\"[0-9a-fA-F]\{4\}\"/ATTRS{idProduct}==\"$PRODUCT\"/" \
    "$HERE/99-appliance-scanner.rules" >"$STAGE/rule"
if [[ -n $SERIAL ]]; then
    sed -i "s/ATTRS{idProduct}==\"$PRODUCT\",/& ATTRS{serial}==\"$SERIAL\",/" "$STAGE/rule"
fi
grep -q "ATTRS{idVendor}==\"$VENDOR\"" "$STAGE/rule" && grep -q "ATTRS{idProduct}==\"$PRODUCT\"" "$STAGE/rule" \
    || die "could not set the USB ids in the udev rule"
install -d -m 0755 "$(dirname "$RULE")"
install -m 0644 "$STAGE/rule" "$RULE"
if command -v udevadm >/dev/null; then
    # udevd does not run in containers; the rule then applies on the next boot.
    if udevadm control --reload-rules 2>/dev/null; then
        udevadm trigger --subsystem-match=tty --action=add 2>/dev/null || true
    else
        warn "udevd is not running; the scanner rule applies from the next boot"
    fi
fi

if ! have_systemd; then
    warn "systemd is not running here: files installed, service not enabled or started"
    exit 0
fi
systemctl daemon-reload
systemctl enable --quiet "$UNIT"
if [[ $START == yes ]]; then
    # `enable --now` would not restart an upgraded running service, so restart (which also starts it).
    # --no-block: the unit only becomes active once the scanner port is open (READY=1), and a scanner
    # that is not plugged in yet must not hang the installer.
    systemctl restart --no-block "$UNIT"
    say "started $UNIT; check it with: systemctl status appliance   and   appliance status"
else
    [[ $WAS_ACTIVE == yes ]] && say "$UNIT was running and was stopped for the upgrade"
    say "enabled $UNIT, not started; start it with: systemctl start --no-block appliance"
fi
