#!/usr/bin/env bash
# The package a user installs: build the sdist and, from it, the wheel; install the wheel with
# no extras into a clean venv, away from this checkout, with an empty model cache; then run a
# generation and the sensor skill from it. That proves models.lock, the skills, the chat
# template and the importance weights (the default model is built with them on first use) ship
# in the package. pip reuses the llama-cpp-python wheel it cached when setup.sh compiled it.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" -m build --outdir "$work/dist" .
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$work"/dist/edgegemma-*.whl

cd "$work"
export EDGEGEMMA_HOME="$work/home"
"$work/venv/bin/python" - <<'PY'
from importlib.resources import files

package = files("edgegemma")
for shipped in ("models.lock", "py.typed", "data/gemma3-chat-template.jinja",
                "data/heldout-en.txt", "data/importance/gemma3-270m.json",
                "skills/data/sensor/adapter.gguf", "skills/data/emoji/adapter.gguf"):
    assert package.joinpath(shipped).is_file(), f"the wheel lacks edgegemma/{shipped}"
PY
"$work/venv/bin/edgegemma" generate "The capital of France is" --max-tokens 8 --stats
# The default model was built here, from the pinned file and the shipped importance weights, and
# loaded only because its bytes matched the sha256 that models.lock pins for it.
test -n "$(ls -A "$EDGEGEMMA_HOME/builds/gguf")" || { echo "no default model was built" >&2; exit 1; }
"$work/venv/bin/python" - <<'PY'
import edgegemma
from edgegemma import skills

with edgegemma.load() as engine:
    engine.load_adapter("sensor", skills.adapter_path("sensor"))
    reading = skills.prompt("sensor", "temp=95.2C vib=0.2g batt=3.9V")
    found = engine.classify(reading, skills.LABELS["sensor"], adapters={"sensor": 1.0})
    assert found.label == " critical", found
    print("sensor skill from the wheel:", found.label, found.scores)
PY
