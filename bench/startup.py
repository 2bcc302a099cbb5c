"""Cold and warm model start: compile time of a real network without and with OpenVINO's model cache.

    .venv/bin/python bench/startup.py [--model models/efficientnet_lite0] [--runs 3]

Each run happens in a fresh process (a new OpenVINO Core), as after a restart of the factory PC.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_ONE_LOAD = """
import json, sys, time
started = time.perf_counter()
from pathlib import Path
from appliance.config.profile import load_profile
from appliance.runtime.models import LoadedModel, RuntimeOptions
from appliance.runtime.store import resolve_version
imported = time.perf_counter()
profile, _ = load_profile("cpu")
cache = Path(sys.argv[2]) if sys.argv[2] != "-" else None
model_dir = Path(sys.argv[1])
loaded = LoadedModel(model_dir.name, resolve_version(model_dir.parent, model_dir.name),
                     RuntimeOptions.from_profile(profile, "CPU", cache))
print(json.dumps({"import_s": imported - started, "load_s": loaded.load_seconds}))
"""


def one_load(model: Path, cache: Path | None) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", _ONE_LOAD, str(model), str(cache) if cache else "-"],
                          capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "efficientnet_lite0"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    model = Path(args.model)
    rows = []
    no_cache = [one_load(model, None) for _ in range(args.runs)]
    rows.append(("no cache", no_cache))
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        rows.append(("cold (empty cache)", [one_load(model, cache)]))
        rows.append(("warm (cache filled)", [one_load(model, cache) for _ in range(args.runs)]))
    print(f"\nModel start of {model.name} on CPU, compile + warm-up inference, fresh process each\n")
    print("| start | runs | load s (median) | import s (median) |")
    print("|---|---|---|---|")
    for name, results in rows:
        print(f"| {name} | {len(results)} | {statistics.median(r['load_s'] for r in results):.3f} | "
              f"{statistics.median(r['import_s'] for r in results):.3f} |")


if __name__ == "__main__":
    main()
