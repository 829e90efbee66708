#!/usr/bin/env bash
# The GPU (H100) measurements of docs/performance.md, in two parts of under 10 minutes each:
#   OUT=some/dir bash benchmarks/gpu_suite.sh 1   # throughput, memory, FLOP/s, torch.compile
#   OUT=some/dir bash benchmarks/gpu_suite.sh 2   # throughput again, profiles, fixed-length documents, attention backends
#   OUT=some/dir bash benchmarks/gpu_suite.sh 3   # packing and Liger: CUDA-only equivalence tests, packed vs padded at 8 docs/step
# Writes *_h100.json, logs and profiles under $OUT. Needs CUDA, torch, transformers, accelerate, peft
# (the package itself from src/, no install). PYTHON overrides the interpreter (default python3).
set -u
OUT=${OUT:?set OUT to an output directory}; mkdir -p "$OUT"; OUT=$(realpath "$OUT"); PY=${PYTHON:-python3}; PART=${1:-1}
cd "$(dirname "$0")/.."
export OUT; S=$(date +%s); export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 CTXDISTILL_CACHE=/tmp/cdc TOKENIZERS_PARALLELISM=false
left(){ echo $(( $1 - ($(date +%s) - S) )); }
B=benchmarks; T="$B/bench_throughput.py --random-init qwen2.5-1.5b --synthetic-docs --device cuda"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit --format=csv | tee $OUT/gpu.txt
$PY -c "import torch,transformers,accelerate,peft;print(torch.__version__,transformers.__version__,accelerate.__version__,peft.__version__)" | tee -a $OUT/gpu.txt
if [ "$PART" = 1 ]; then
  timeout $(left 270) $PY $T --variants ft,disc_reference,disc,disc_all_sentences --docs 24 --warmup 4 --child-timeout 120 --out $OUT/throughput_qwen1.5b_h100.json > $OUT/tp.log 2>&1; echo "tp rc=$? t=$(( $(date +%s)-S ))"
  timeout $(left 340) $PY $B/bench_memory.py --device cuda --out $OUT/memory_h100.json > $OUT/mem.log 2>&1; echo "mem rc=$? t=$(( $(date +%s)-S ))"
  timeout $(left 410) $PY $B/bench_memory.py --device cuda --shape qwen2.5-1.5b --vocabs "" --out $OUT/memory_qwen1.5b_h100.json > $OUT/memq.log 2>&1; echo "memq rc=$? t=$(( $(date +%s)-S ))"
  timeout $(left 480) $PY $B/bench_flops.py --device cuda --random-init qwen2.5-1.5b:1x2048,qwen2.5-1.5b:4x2048,qwen2.5-7b:1x2048:bf16 --nominal-peak-tflops 989 --out $OUT/flops_h100.json > $OUT/flops.log 2>&1; echo "flops rc=$? t=$(( $(date +%s)-S ))"
  timeout $(left 585) $PY $T --variants disc,disc_compile,ft,ft_compile --docs 12 --warmup 4 --child-timeout 150 --out $OUT/compile_qwen1.5b_h100.json > $OUT/comp.log 2>&1; echo "comp rc=$? t=$(( $(date +%s)-S ))"
elif [ "$PART" = 3 ]; then
  # Liger (needs liger-kernel: pip install 'ctxdistill[liger]'); the tests skip themselves without it
  timeout $(left 120) $PY -m pytest -q tests/test_chunked_losses.py -k liger > $OUT/liger_tests.log 2>&1; echo "liger tests rc=$? t=$(( $(date +%s)-S ))"; tail -3 $OUT/liger_tests.log
  timeout $(left 360) $PY $T --variants disc_padded,disc_packed,ft_padded,ft_packed --docs 48 --warmup 8 --docs-per-step 8 --child-timeout 120 --out $OUT/packing_qwen1.5b_h100.json > $OUT/packing.log 2>&1; echo "packing rc=$? t=$(( $(date +%s)-S ))"
  timeout $(left 580) $PY $B/bench_memory.py --device cuda --shape qwen2.5-1.5b --vocabs "" --lengths 1024,8192 --out $OUT/memory_8k_qwen1.5b_h100.json > $OUT/mem8k.log 2>&1; echo "mem8k rc=$? t=$(( $(date +%s)-S ))"
else
  timeout $(left 300) $PY $T --variants ft,disc_reference,disc,disc_all_sentences --docs 24 --warmup 4 --child-timeout 120 --out $OUT/throughput_qwen1.5b_h100.json > $OUT/run.log 2>&1; echo "tp rc=$? t=$(( $(date +%s)-S ))"
  timeout $(left 450) $PY $T --variants ft,disc --docs 8 --warmup 3 --child-timeout 120 --profile-dir $OUT --out $OUT/profiled.json >> $OUT/run.log 2>&1; echo "prof rc=$? t=$(( $(date +%s)-S ))"
  timeout $(left 580) $PY $T --variants ft,disc --docs 12 --warmup 4 --doc-tokens 2048-2048 --child-timeout 120 --out $OUT/throughput_fixed2048_qwen1.5b_h100.json >> $OUT/run.log 2>&1; echo "fixed rc=$? t=$(( $(date +%s)-S ))"
  S=$(date +%s)
  timeout 60 $PY $B/bench_sdpa_shapes.py --out $OUT/sdpa_shapes_h100.json > $OUT/sdpa.log 2>&1; echo "sdpa rc=$? t=$(( $(date +%s)-S ))"
  timeout 250 $PY $T --variants ft,disc_reference,disc --docs 24 --warmup 4 --child-timeout 100 --sdpa-backends flash_attention,efficient_attention,math --out $OUT/throughput_noncudnn_qwen1.5b_h100.json > $OUT/tp_noncudnn.log 2>&1; echo "noncudnn rc=$? t=$(( $(date +%s)-S ))"
fi
$PY - <<'PY'
import glob, json, os
for f in sorted(glob.glob(os.environ["OUT"] + "/*.json")):
    d = json.load(open(f)); print("##", os.path.basename(f))
    if "ratios" in d: print(json.dumps(d["ratios"]))
    for k, v in d.get("variants", {}).items(): print(k, {x: v.get(x) for x in ("documents_per_s", "student_tokens_per_s", "step_s_median", "peak_memory_mb", "error")})
    if "logits_memory_mb_by_length" in d: print(d["logits_memory_mb_by_length"], d.get("logits_memory_mb_by_vocab"), d["chunked_growth"])
    if "runs" in d:
        print(d["matmul_peak"])
        for r in d["runs"]: print(r["shape"], r["batch"], r["tokens"], r["weights"], r["step"], r["achieved"], r["peak_memory_mb"])
    if "backends" in d: print(d["default_flags"], {k: (v.get("median_new_ms"), v.get("median_seen_ms")) for k, v in d["backends"].items()})
PY
