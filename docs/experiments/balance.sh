#!/usr/bin/env bash
# The balance ablation: the same run of `tiny` with each balance mode, then one comparison plot and a table.
#   bash docs/experiments/balance.sh        (from the repository root; ~12 minutes on 2 CPU cores)
set -euo pipefail
BIN=${BIN:-.venv/bin}
export OMP_WAIT_POLICY=PASSIVE  # see the Makefile's demo target
rm -rf runs/balance && mkdir -p runs/balance
"$BIN/dsv3" tokenizer train --out runs/balance/tokenizer --vocab-size 4096
for mode in aux-free aux-loss none; do
    "$BIN/dsv3" train docs/experiments/balance.toml --train.balance "$mode" --run.dir "runs/balance/$mode"
done
"$BIN/python" - <<'PY'
import json
from dsv3.train.plots import compare_runs

modes = ["aux-free", "aux-loss", "none"]
rows = compare_runs([f"runs/balance/{m}" for m in modes], "docs/experiments/balance.png", labels=modes)
print("| mode | tokens | final val loss | val bits/byte | MaxVio, last 10% of steps | MaxVio, whole run |")
print("|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['run']} | {r['tokens']:,} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | "
          f"{r['maxvio_last10']:.3f} | {r['maxvio_mean']:.3f} |")
json.dump(rows, open("runs/balance/summary.json", "w"), indent=2)
PY
