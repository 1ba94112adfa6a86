#!/usr/bin/env bash
# The exact commands that produced docs/results/magnetic-tile (run from the repository root).
set -e
.venv/bin/adspine data magnetic-tile --src ../shared/data/magnetic-tile --out /work/mt --seed 1024 --n-train 200 --n-test-good 100 --overwrite || true
for s in study study-cflow study-spade; do
  .venv/bin/adspine study docs/results/magnetic-tile/$s.yaml --db /work/mtrun/results.sqlite
done
.venv/bin/adspine report --db /work/mtrun/results.sqlite --out /work/mtrun/report
