# Sourced by the CI scripts once they have set $work: pip's output only when it fails.
pip_quietly() {
  python -m pip "$@" > "$work/pip.log" 2>&1 || { cat "$work/pip.log"; echo "FAILED: pip $*"; exit 1; }
}
