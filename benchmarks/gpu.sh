#!/bin/bash
# AT-RL's cost on a CUDA GPU, phase by phase: probes, the trainer's step, the vision tower (not CI).
#
#   pip install -e .                                    # atrl over your CUDA build of torch
#   bash benchmarks/gpu.sh probe-batch vision          # probes at batch 4 (3B, 7B), the vision tower: ~6 min
#   OUT=results bash benchmarks/gpu.sh aligned spg2    # the 3B trainer on both credit sites: ~5 min
#
# Models are built on the device with random weights at the Qwen2.5-VL-3B / 7B shapes (nothing is downloaded; a
# 7B shape needs about 40 GiB). Phases run in the order given:
#   smoke        the tiny trainer on CUDA, every mode, both credit sites, synchronisations named (~1 min)
#   probe        3B and 7B probe overhead at batch 1, decoder scope, 7 configurations, a profiled step (~4 min)
#   probe-batch  the same at batch 4, a trainer's micro-batch (~4.5 min)
#   probe-video  7B probe overhead on a video prompt: 16 frames of 256 merged tokens (8 x 256), decoder scope (~2.5 min)
#   vision       the vision tower's attention: a call per window against one per segment length (~1.5 min)
#   probe-alloc  the decoder scope with expandable allocator segments (~2-3 min)
#   aligned      3B trainer, probes on the training forward, generation replayed, one profiled cycle (~4 min)
#   spg2         3B trainer, probes on the old-log-prob pass, generation replayed (~2.5 min)
#   trainer      aligned and spg2
#   generation-ab  generation with and without the probe's attention installed (~1.5 min)
# The timed rounds stop at a time budget (`--seconds`), so a slower card runs fewer rounds, not longer. Each
# phase writes its tables and JSON under $OUT (default ./gpu-results) and prints the tables last. Wheels in
# .whl/ (for a machine without network) are installed first. docs/benchmarks.md has the current figures.
set -uo pipefail
phases=("${@:-probe}")
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
for phase in "${phases[@]}"; do
case $phase in
  smoke)
    # spg 1 with 4 regions per image (head size 16): the probe's narrow values run on the training forward,
    # beside a padding mask; spg 2 with the default 16 (no narrow values: as wide as the heads). --sync-debug:
    # every host-device synchronisation per mode, by the call that made it (the table's "atrl - uniform" column
    # names any sync atrl adds; shape-independent, so the tiny model shows it in seconds)
    for spg in 1 2; do
      grid=$([ "$spg" = 1 ] && echo "2 2" || echo "4 4")
      timeout 120 python3 benchmarks/trainer_overhead.py --shape tiny --steps 4 --blocks 1 --completion 32 \
        --steps-per-generation "$spg" --region-grid $grid --modes uniform atrl atrl-overlap-off --workers 4 --sync-debug \
        2>&1 | tee -a "$out/smoke.txt" | grep -v "it/s\]\|^{"
    done ;;
  probe)
    # decoder scope only (--reps 0): the whole-model scope is launch-bound and +-8% noisy; PROBE_REPS=20 times it
    # too (+2 min)
    for shape in 3b 7b; do
      # as many rounds as fit in 70 s (H200: ~75 at 3B, ~55 at 7B; an H100 is slower)
      timeout 260 python3 benchmarks/probe_overhead.py --shape "$shape" --reps "${PROBE_REPS:-0}" --decoder-reps 150 \
        --seconds 70 --out "$out/probe-$shape.json" 2>&1 | tee "$out/probe-$shape.txt"
      # the device's state right after the shape's timings (a card that throttles runs slower, noisier rounds):
      # clocks, temperature, power, throttling
      nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,temperature.gpu,power.draw,clocks_throttle_reasons.active \
        --format=csv | sed "s/^/after $shape: /" | tee -a "$out/device.txt"
    done
    if python3 -c "import flash_attn" 2>/dev/null; then
      timeout 150 python3 benchmarks/probe_overhead.py --shape 7b --reps 20 --attn flash_attention_2 \
        --out "$out/probe-7b-flash.json" 2>&1 | tee "$out/probe-7b-flash.txt"
    else
      echo "flash-attn is not installed: FlashAttention route not timed"
    fi
    grep -h "^#\|^|\|^probe vs\|^allocator\|rounds fit" "$out"/probe-*.txt ;;
  probe-batch)
    # the decoder scope at a trainer's micro-batch (4 sequences, the recipes' per_device_train_batch_size): at
    # batch 1 the 3B step is near host-bound on an H100 (device idle 40% of a profiled step) and host jitter (+-15%) hides a fraction of a percent; at batch 4 the device's work grows 4x, the host's not
    for shape in 3b 7b; do
      timeout 240 python3 benchmarks/probe_overhead.py --shape "$shape" --batch 4 --reps 0 --decoder-reps 100 \
        --seconds 80 --layer-reps 100 --profile-steps 2 --out "$out/probe-$shape-batch4.json" 2>&1 \
        | tee "$out/probe-$shape-batch4.txt"
      nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,temperature.gpu,power.draw,clocks_throttle_reasons.active \
        --format=csv | sed "s/^/after $shape batch 4: /" | tee -a "$out/device.txt"
    done
    grep -h "^#\|^|\|^allocator\|rounds fit" "$out"/probe-*-batch4.txt ;;
  probe-video)
    # a Qwen2.5-VL-7B video prompt as the video recipe makes it: 16 frames at a 32 x 32 patch grid (448 x 448),
    # 8 temporal patches of 256 merged tokens; the video's regions are 4 stretches of time x 16 cells
    timeout 240 python3 benchmarks/probe_overhead.py --shape 7b --frames 16 --grid 32 --reps 0 --decoder-reps 120 \
      --seconds 70 --layer-reps 100 --profile-steps 2 --out "$out/probe-7b-video.json" 2>&1 \
      | tee "$out/probe-7b-video.txt"
    grep -h "^#\|^|\|^allocator\|rounds fit" "$out"/probe-7b-video.txt ;;
  vision)
    # the 3B/7B vision tower, 4 images of ~1,024 merged tokens (the recipes' max_pixels), forward + backward:
    # transformers' SDPA loop (a call per window: the 3B step's top host cost) against a call per segment length
    # (atrl.models.vision_attention, the recipes' default) (~1.5 min)
    timeout 200 python3 benchmarks/vision_attention.py --shape 3b --images 4 --grid 64 --reps 40 --seconds 45 \
      --out "$out/vision-3b.json" 2>&1 | tee "$out/vision-3b.txt" | grep "^#\|^|\|^largest" ;;
  probe-alloc)
    # the decoder scope again with the caching allocator's expandable segments: if a probed step's fixed cost
    # (beyond its attention calls and the fixed-cost table) is the allocator splitting and freeing blocks,
    # it shrinks here (~2 min)
    for shape in 3b 7b; do
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 150 python3 benchmarks/probe_overhead.py \
        --shape "$shape" --reps 0 --decoder-reps 50 --layer-reps 50 --out "$out/probe-$shape-expandable.json" \
        2>&1 | tee "$out/probe-$shape-expandable.txt" | grep "^#\|^|"
    done ;;
  aligned|trainer)
    # generation aligned with the optimizer step (TRL's default without vLLM): probes on the training forward.
    # Generation replayed (one real call, ~10-25 s): the modes differ only in the rest of the step, which real
    # generation's +-12% noise would bury (~3.5 min)
    # --profile: then one cycle per mode under the profiler, the kernels and host-side ops that differ (~40 s)
    # rounds of blocks: as many as fit in 150 s, up to 6 (H200: ~50 s a round); --phases: one more block per mode
    # with the device synchronised around scoring, the loss's forward and the backward (~35 s)
    timeout 320 python3 benchmarks/trainer_overhead.py --shape 3b --steps 8 --blocks 6 --seconds 150 \
      --replay-generation --phases --profile --out "$out/trainer-3b.json" 2>&1 | tee "$out/trainer-3b.txt" \
      | grep -v "it/s\]\|^{"
    grep -h "^#\|^|\|spread\|^block\|^device memory\|^allocator\|^garbage\|rounds of" "$out"/trainer-3b.txt ;;&
  spg2|trainer)
    # an old-log-prob pass (as always with vLLM): probes ride on it, partitions overlap; add atrl-overlap-off to
    # --modes to time the loop without overlap (~2.5 min)
    timeout 250 python3 benchmarks/trainer_overhead.py --shape 3b --steps 8 --blocks 4 --seconds 90 \
      --steps-per-generation 2 --replay-generation --phases --modes uniform atrl --out "$out/trainer-3b-spg2.json" \
      2>&1 | tee "$out/trainer-3b-spg2.txt" | grep -v "it/s\]\|^{"
    grep -h "^#\|^|\|spread\|^block\|^device memory\|^allocator\|^garbage\|rounds of" "$out"/trainer-3b-spg2.txt ;;
  aligned) ;;
  generation-ab)
    # model.generate with and without the probe's attention installed (~1.5 min)
    timeout 150 python3 benchmarks/trainer_overhead.py --shape 3b --steps 2 --blocks 1 --generation-ab 4 \
      --replay-generation --out "$out/generation-ab.json" 2>&1 | grep "^#\|^|" | tee "$out/generation-ab.txt" ;;
  *) echo "unknown phase $phase: use smoke, probe, probe-batch, vision, probe-alloc, aligned, spg2, trainer or" \
       "generation-ab" >&2
     exit 2 ;;
esac
done
