#!/usr/bin/env bash
# Wheels some GPU machine images lack beside the offline bundle (vLLM's serve entry point, which diaglib's parser
# imports, needs uvicorn, watchfiles, ...): each distribution in /tmp/bundle/extra that the bundle's Python does
# not have goes into /tmp/extra, which /tmp/site/env.sh then puts on PYTHONPATH after the bundle's own site.
#   bash scripts/gpu/install_extra.sh        (after install-bundle.sh; the wheels: pip download --no-deps)
set -euo pipefail
. /tmp/site/env.sh
missing=$(python3 - <<'EOF'
import importlib.metadata as md
import pathlib

for wheel in sorted(pathlib.Path("/tmp/bundle/extra").glob("*.whl")):
    try:
        md.version(wheel.name.split("-")[0])
    except md.PackageNotFoundError:
        print(wheel)
EOF
)
[ -z "$missing" ] || python3 -m pip install -q --no-index --no-deps --target /tmp/extra $missing
grep -q /tmp/extra /tmp/site/env.sh || echo 'export PYTHONPATH="$PYTHONPATH:/tmp/extra"' >> /tmp/site/env.sh
echo "extra: $(echo $missing | wc -w) wheels installed"
