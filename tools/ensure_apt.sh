#!/usr/bin/env bash
# Install the Debian packages that are missing, and only those.
# Usage: tools/ensure_apt.sh ENTRY...   where ENTRY is `package` (checked with dpkg) or
# `command:package` (checked with `command -v command`, so a tool installed another way counts).
set -euo pipefail

missing=()
for entry in "$@"; do
  if [[ "$entry" == *:* ]]; then
    cmd="${entry%%:*}"
    pkg="${entry#*:}"
    command -v "$cmd" >/dev/null 2>&1 && continue
  else
    pkg="$entry"
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] && continue
  fi
  missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

sudo=()
if [[ "$(id -u)" != 0 ]]; then
  sudo=(sudo)
fi
echo "ensure_apt: installing ${missing[*]}" >&2
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
