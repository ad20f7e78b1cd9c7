"""What the relearning attack restored (held-out accuracy after - before, per fact), each LAT
twin minus its row, paired by seed and fact, with the toolkit's bootstrap interval.

    .venv/bin/python docs/results/lat-unlearn-matched/restored_twins.py docs/results/lat-unlearn-matched
"""

import json
import sys
from pathlib import Path

from mechunlearn.report.claims import by_seed
from mechunlearn.report.paired import paired_difference

folder = Path(sys.argv[1])
part = "relearn@paper"


def restored(name: str) -> dict[int, dict[str, float]]:
    runs = [json.loads(p.read_text()) for p in sorted((folder / "results" / name).glob("seed*.json"))]
    after = by_seed(runs, f"{part}.completion.accuracy")
    before = by_seed(runs, f"{part}.before.completion.accuracy")
    return {s: {f: after[s][f] - before[s][f] for f in after[s]} for s in after}


pairs = [
    (p["name"], p["match_forgetting"]["row"])
    for p in __import__("yaml").safe_load((folder / "config.yaml").read_text())["localizations"]
    if p.get("match_forgetting")
] or [("GA_LAT", "GA"), ("fact_lookup_LAT", "fact_lookup"), ("RMU_LAT", "RMU")]
print("| twin - row | restored by relearning, twin - row [95% CI] | seeds | pairs |")
print("|---|---|---|---|")
for twin, row in pairs:
    d = paired_difference(restored(twin), restored(row))
    print(
        f"| {twin} - {row} | {100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}] | "
        f"{d.n_seeds} | {d.n_facts} |"
    )
