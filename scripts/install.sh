#!/usr/bin/env bash
# Install e2e-verification into ./.venv. With --test, also the Debian packages the tests use
# (real speech from Asterisk's voice prompts, sox for its GSM files, Fashion-MNIST); the Slurm and
# Grid Engine daemons are installed by scripts/slurm_cluster.sh and scripts/sge_cluster.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--test" ]; then
  packages=(sox dataset-fashion-mnist asterisk-core-sounds-en-wav asterisk-core-sounds-es-wav
            asterisk-core-sounds-fr-wav asterisk-core-sounds-it-wav asterisk-core-sounds-ru-wav
            asterisk-prompt-es-co asterisk-prompt-fr-armelle asterisk-prompt-it-menardi-wav)
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
      apt-get update -q
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    else
      echo "install.sh: not root; tests that need these Debian packages will be skipped: ${missing[*]}" >&2
    fi
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
