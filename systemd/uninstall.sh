#!/usr/bin/env bash
# Stop and remove the appliance service: unit, udev rule, /opt/appliance. Keeps /var/lib/appliance (cases,
# database, API token) and /etc/appliance (settings) unless --purge is given. Same as install.sh --uninstall.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/install.sh" --uninstall "$@"
