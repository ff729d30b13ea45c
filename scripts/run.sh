#!/usr/bin/env bash
# Installs what is missing, then runs one job. Idempotent: a second call skips every install
# step whose inputs have not changed.
#   bash scripts/run.sh demo   # the main job: `trojanscan demo` on the embedded defaults
#   bash scripts/run.sh test   # the whole test suite
#   bash scripts/run.sh env    # only install
set -euo pipefail
job="${1:-demo}"; shift || true
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {  # apt_install PACKAGE...: install the Debian packages that are missing
  local missing=()
  for package in "$@"; do dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing Debian packages: ${missing[*]}" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
}

python_env() {  # the virtual environment with the project and its pinned dependencies
  local extras="$1" stamp
  stamp="$venv/.trojanscan-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-$extras"
  [ -f "$stamp" ] && return 0
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  echo "installing Python packages (first run: a few minutes)" >&2
  # Every step pins torch==2.13.0 through constraints.txt: an unpinned resolve pulls CUDA torch.
  "$venv/bin/pip" install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
  "$venv/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e ".[$extras]"
  # onnx2torch requires torchvision, which cannot run beside CPU torch: install it alone.
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps onnx2torch==1.5.15
  rm -f "$venv"/.trojanscan-*
  touch "$stamp"
}

case "$job" in
  env)
    apt_install dataset-fashion-mnist
    python_env test ;;
  demo)
    apt_install dataset-fashion-mnist
    python_env test
    exec "$venv/bin/trojanscan" demo "$@" ;;
  test)
    apt_install dataset-fashion-mnist chromium  # chromium: the report's browser tests (Playwright)
    python_env test
    export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
    exec "$venv/bin/python" -m pytest -q "$@" ;;
  *)
    echo "usage: bash scripts/run.sh demo|test|env" >&2; exit 4 ;;
esac
