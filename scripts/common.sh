#!/usr/bin/env bash
# Helpers shared by the launch scripts (sourced, not run).

# abspath PATH: absolute path of PATH (which may not exist yet).
abspath() {
  case "$1" in
    /*) echo "$1" ;;
    ~*) echo "$HOME${1:1}" ;;
    *) echo "$(pwd)/$1" ;;
  esac
}

# need_file NAME PATH / need_dir NAME PATH: exit 1 with the usage line when missing.
need_file() { [ -f "$2" ] || { echo "error: $1 is not a file: $2"; usage; exit 1; }; }
need_dir() { [ -d "$2" ] || { echo "error: $1 is not a folder: $2"; usage; exit 1; }; }

# launch COMMAND ARGS...: python -m src.launch COMMAND ARGS... from the caller's folder (the
# arguments' relative paths are relative to it); the checks, the plan and the start live there.
launch() { PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" python -m src.launch "$@"; }

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export REPO_DIR
