#!/bin/bash
# The GPU benchmarks of issues 4 and 6 in one script, for one call on the lent machine (not CI).
#
#   ../shared/tools/gpu-wheels                      # here, once: trl, datasets, pymetis, ... into .whl/
#   run(command="bash benchmarks/gpu.sh probe", carry=[".whl"])     # ~5 min: 3B and 7B probe overhead
#   run(command="bash benchmarks/gpu.sh trainer", carry=[".whl"])   # ~7 min: atrl / uniform step time
#
# Each phase writes its tables and JSON under $OUT (or ./gpu-results) and prints the tables last.
# `probe_overhead.py` first checks the probe against eager attention at the real shape, in bf16; `probe`
# also times the FlashAttention route when flash-attn is installed.
set -uo pipefail
phase=${1:-probe}
out=${OUT:-gpu-results}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
else
  export PYTHONPATH=$PWD/src:$PWD/benchmarks
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv \
  | tee "$out/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$out/device.txt"
case $phase in
  probe)
    for shape in 3b 7b; do
      timeout 200 python3 benchmarks/probe_overhead.py --shape "$shape" --reps 30 --out "$out/probe-$shape.json" \
        2>&1 | tee "$out/probe-$shape.txt"
    done
    if python3 -c "import flash_attn" 2>/dev/null; then
      timeout 150 python3 benchmarks/probe_overhead.py --shape 7b --reps 20 --attn flash_attention_2 \
        --out "$out/probe-7b-flash.json" 2>&1 | tee "$out/probe-7b-flash.txt"
    else
      echo "flash-attn is not installed: FlashAttention route not timed" | tee "$out/probe-7b-flash.txt"
    fi
    grep -h "^#\|^|\|^probe vs" "$out"/probe-*.txt ;;
  trainer)
    # 1. generation aligned with the optimizer step (TRL's default without vLLM): probes on the training forward
    timeout 270 python3 benchmarks/trainer_overhead.py --shape 3b --steps 4 --blocks 2 --out "$out/trainer-3b.json" \
      2>&1 | tee "$out/trainer-3b.txt" | grep -v "it/s\]"
    # 2. an old-log-prob pass (as always with vLLM): probes ride on it, partitions overlap; overlap off for contrast
    timeout 300 python3 benchmarks/trainer_overhead.py --shape 3b --steps 6 --blocks 2 --steps-per-generation 2 \
      --modes uniform atrl atrl-overlap-off --out "$out/trainer-3b-spg2.json" \
      2>&1 | tee "$out/trainer-3b-spg2.txt" | grep -v "it/s\]"
    grep -h "^#\|^|\|spread" "$out"/trainer-3b*.txt ;;
  *) echo "unknown phase $phase: use probe or trainer" >&2; exit 2 ;;
esac
