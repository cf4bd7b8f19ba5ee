#!/usr/bin/env bash
# Install e2e-verification into ./.venv. With --test, also the Debian packages the tests use
# (real speech from Asterisk's voice prompts, sox for its GSM files, Fashion-MNIST, the fonts of
# tools/font_set.py); the Slurm and Grid Engine daemons are installed by scripts/slurm_cluster.sh
# and scripts/sge_cluster.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--test" ]; then
  packages=(sox dataset-fashion-mnist asterisk-core-sounds-en-wav asterisk-core-sounds-es-wav
            asterisk-core-sounds-fr-wav asterisk-core-sounds-it-wav asterisk-core-sounds-ru-wav
            asterisk-prompt-es-co asterisk-prompt-fr-armelle asterisk-prompt-it-menardi-wav
            # the fonts of tools/font_set.py
            fonts-3270 fonts-agave fonts-anonymous-pro fonts-bebas-neue fonts-beteckna fonts-bpg-georgian
            fonts-breip fonts-cabin fonts-cantarell fonts-cardo fonts-cmu fonts-comfortaa fonts-courier-prime
            fonts-croscore fonts-crosextra-caladea fonts-crosextra-carlito fonts-dejavu-extra
            fonts-dkg-handwriting fonts-dosis fonts-ebgaramond fonts-fantasque-sans fonts-firacode
            fonts-freefont-otf fonts-freefont-ttf fonts-go fonts-hack fonts-hermit fonts-humor-sans
            fonts-inconsolata fonts-inter fonts-jetbrains-mono fonts-junicode fonts-lato fonts-league-spartan
            fonts-liberation2 fonts-linuxlibertine fonts-lmodern fonts-manrope fonts-monoid fonts-mononoki
            fonts-noto-core fonts-noto-mono fonts-oflb-asana-math fonts-oflb-euterpe fonts-oldstandard
            fonts-open-sans fonts-paratype fonts-quicksand fonts-radisnoir fonts-recommended fonts-roboto-slab
            fonts-roboto-unhinted fonts-stix fonts-texgyre fonts-texgyre-math fonts-tuffy fonts-uralic
            fonts-urw-base35 fonts-vollkorn fonts-yanone-kaffeesatz)
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
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps speechbrain
fi
