# Shared set-up for ./scripts/run and ./scripts/test (sourced, not executed).
# Idempotent: a second run reuses what the first installed.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root (or sudo) to run: $*"; fi
}

find_binary() {  # first of the names found on PATH or in the sbin folders
  local name
  for name in "$@"; do
    command -v "$name" 2>/dev/null && return 0
    for dir in /usr/sbin /usr/bin /sbin; do
      [ -x "$dir/$name" ] && { echo "$dir/$name"; return 0; }
    done
  done
  return 1
}

ensure_system_packages() {
  local wanted=()
  find_binary redis-server >/dev/null || wanted+=(redis-server)
  find_binary mariadbd mysqld >/dev/null || wanted+=(mariadb-server)
  find_binary mariadb mysql >/dev/null || wanted+=(mariadb-client)
  python3 -c 'import ensurepip, venv' 2>/dev/null || wanted+=(python3-venv)
  # Each extra is a package, or package:command when the command it installs has another name.
  local extra package command
  for extra in "$@"; do
    package="${extra%%:*}" command="${extra#*:}"
    command -v "$command" >/dev/null || wanted+=("$package")
  done
  if [ ${#wanted[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${wanted[*]} and no apt-get to install them"
    say "installing ${wanted[*]} with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # RUNLEVEL=1 keeps invoke-rc.d from starting the packages' own system services: we run private ones.
    as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
      apt-get install -y -qq --no-install-recommends "${wanted[@]}" >/dev/null
  fi
}

ensure_venv() {
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "Python 3.11 or newer is required (found $(python3 --version 2>&1))"
  [ -x "$PY" ] || { say "creating .venv"; python3 -m venv "$VENV"; }
  local stamp="$VENV/.installed" extras="${1:-test}"
  if [ ! -f "$stamp" ] || [ "$ROOT/setup.cfg" -nt "$stamp" ] || [ "$(cat "$stamp")" != "$extras" ] \
    || [ "$ROOT/deploy/requirements.lock" -nt "$stamp" ]; then
    say "installing the package and its [$extras] extras into .venv"
    local log="$VENV/pip-install.log"
    # The runtime dependencies at the versions the image ships (hashes checked), then the
    # package and the extras of this command around them.
    { "$PY" -m pip install -q --upgrade pip \
        && "$PY" -m pip install -q --require-hashes -r "$ROOT/deploy/requirements.lock" \
        && "$PY" -m pip install -q -e "$ROOT[$extras]"; } >"$log" 2>&1 \
      || { tail -20 "$log" >&2; die "pip install failed; see $log"; }
    "$PY" -c 'import gateway, stream_worker, shared' || die "package install failed"
    echo "$extras" >"$stamp"
  fi
}
