#!/usr/bin/env bash
# Relabel a small GFN2-xTB campaign on ethanol with DFT (PySCF PBE/def2-SVP), interrupted once with
# SIGINT and resumed, then show from the event log that no frame was labelled twice.
#
#   scripts/recompute_demo.sh            # writes runs/recompute_demo/ (a few minutes on 2 cores)
#
# Steps: (1) a small xTB campaign (tiny 2-member model, ~50 frames); (2) `aimspax-like recompute`
# stopped by SIGINT after INTERRUPT_S seconds (exit 130); (3) the same command again (exit 0);
# (4) label_done events per source frame, counted over both driver runs.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO:-runs/recompute_demo}
INTERRUPT_S=${INTERRUPT_S:-60}
BIN=.venv/bin/aimspax-like
mkdir -p "$DEMO"

cat > "$DEMO/ethanol_xtb.yaml" <<EOF
# A deliberately small GFN2-xTB campaign: the dataset to relabel, not a model to use.
system:
  structures: $(pwd)/configs/structures/ethanol.xyz
reference:
  kind: xtb
  method: GFN2-xTB
model: {ensemble_size: 2, channels: 8, max_L: 0, r_max: 4.5, num_interactions: 1, correlation: 2,
        radial_mlp: [16], dtype: float32, device: cpu}
idg: {sampler: reference, points_per_member: 4, intermediate_epochs: 4, max_epochs: 12, max_set_size: 24,
      valid_ratio: 0.2}
al: {num_trajectories: 2, check_every: 10, warmup: 10, valid_ratio: 0.2, max_train_set_size: 30,
     max_epochs_per_point: 1, max_md_steps: 300}
converge: {patience: 4, max_epochs: 10}
test_set: {size: 3, stride: 20}
cluster: {kind: local, max_workers: 2}
output: {directory: $DEMO/ethanol}
EOF

cat > "$DEMO/pyscf.yaml" <<'EOF'
# The level of theory to relabel with; relative paths (none here) resolve against this folder.
reference:
  kind: pyscf
  xc: PBE
  basis: def2-SVP
cluster:
  kind: local
  max_workers: 2
EOF

if [ ! -f "$DEMO/ethanol/report/summary.json" ]; then
    "$BIN" run "$DEMO/ethanol_xtb.yaml" --quiet --overwrite
fi
rm -rf "$DEMO/ethanol-pyscf"

echo "== recompute, interrupted by SIGINT after ${INTERRUPT_S} s"
set +e
timeout --preserve-status -s INT "$INTERRUPT_S" "$BIN" recompute "$DEMO/ethanol" --reference "$DEMO/pyscf.yaml"
echo "exit code: $?"
set -e
echo "== the same command again"
"$BIN" recompute "$DEMO/ethanol" --reference "$DEMO/pyscf.yaml"
echo "exit code: $?"

echo "== label_done per source frame over both runs (logs/events.jsonl)"
.venv/bin/python - "$DEMO/ethanol-pyscf" <<'EOF'
import sys
from collections import Counter
from pathlib import Path

from aimspax_like.data import DatasetStore
from aimspax_like.events import read_events

out = Path(sys.argv[1])
events = read_events(out / "logs" / "events.jsonl")
for e in events:
    if e["event"] in ("recompute_start", "recompute_end"):
        print({k: v for k, v in e.items() if k not in ("t", "run", "out", "splits")})
done = Counter(e["source"] for e in events if e["event"] == "label_done" and e.get("phase") == "recompute")
sent = Counter(e["source"] for e in events if e["event"] == "label_submitted" and e.get("phase") == "recompute")
sources = [f.source for f in DatasetStore(out / "data" / "dataset.h5").frames()]
print(f"frames stored {len(sources)}, distinct sources {len(set(sources))}")
print(f"label_done: {sum(done.values())} events over {len(done)} source frames, most per frame {max(done.values())}")
print(f"label_submitted: {sum(sent.values())} events; sent twice: {sorted(k for k, n in sent.items() if n > 1)}")
EOF
