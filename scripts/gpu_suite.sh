#!/usr/bin/env bash
# One batched session on the lent GPU: build, GPU tests, kernel benchmarks. Logs and JSON go
# to $OUT (default ./out). Usage: bash scripts/gpu_suite.sh STAGE... with stages tests, quick,
# tests-more, nf4 (NF4_ARGS=--sweep), kernels, flash, flash-sweep, load, e2e (E2E_ARGS=...), profile (PROFILE_ARGS=...),
# families (the model families' GPU tests, bf16 kernels against the reference ops),
# generate (generation's GPU tests, then bench_generate.py with GEN_ARGS),
# train-graph (the graphed training step's GPU tests, bench_trainer.py eager vs graph, then bench_e2e.py ours vs ours-graph, GRAPH_ARGS),
# trainers-graph (for_training(cuda_graph=True) under transformers' Trainer and trl: GPU tests, bench_hf_trainer.py both ways)
# decode (the NF4 decode kernels: GPU tests, the dispatch tables' sweep and the 2.5x-bitsandbytes floor table at
# M = 1-16, from L2 and from HBM; with ncu on the path, DECODE_NCU="q/o:2:mma:8:1 k/v:2:gemv:4:4:4" profiles those products one by one,
# caches not flushed between passes: the weights stay in L2 as in the graph-timed harness)
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
. scripts/gpu_build.sh || exit 1
cd /tmp
for stage in "$@"; do
  case $stage in
    tests)
      # file by file, each under a time cap, so one slow or hung file cannot eat the lease
      for f in test_nf4 test_rms_norm test_activation test_rope test_cross_entropy test_model_kernels \
               test_flash_attention; do
        echo "== $f"
        timeout ${TEST_CAP:-240} python3 -m pytest -q -rf -p no:cacheprovider --durations=3 "$FQ_SRC/tests/$f.py" \
          > "$OUT/$f.log" 2>&1; echo "rc=$?"
        grep -E "^FAILED|passed|failed|s call" "$OUT/$f.log" | head -12
      done ;;
    quick)  # the GPU tests of the NF4 and RMSNorm code (minutes, not the whole suite)
      timeout ${TEST_CAP:-300} python3 -m pytest -q -rf -p no:cacheprovider "$FQ_SRC/tests/test_nf4.py" \
        "$FQ_SRC/tests/test_rms_norm.py" 2>&1 | tail -5 | tee "$OUT/quick.log" ;;
    tests-more)
      python3 -m pytest -q -p no:cacheprovider -m gpu "$FQ_SRC/tests" 2>&1 | tail -30 | tee "$OUT/tests_more.log" ;;
    nf4) python3 "$FQ_SRC/benchmarks/bench_nf4_dequant.py" --out "$OUT/nf4_dequant.json" ${NF4_ARGS:-} 2>&1 | tail -50 ;;
    kernels) python3 "$FQ_SRC/benchmarks/bench_kernels.py" --out "$OUT/kernels.json" 2>&1 | tail -20 ;;
    flash) python3 "$FQ_SRC/benchmarks/bench_flash_attention.py" --out "$OUT/flash.json" 2>&1 | tail -10 ;;
    flash-sweep) python3 "$FQ_SRC/benchmarks/bench_flash_attention.py" --sweep --out "$OUT/flash_sweep.json" 2>&1 | grep -v Warn | tail -12 ;;
    load) python3 "$FQ_SRC/benchmarks/bench_load.py" --shape llama-3-8b --tmp /tmp/fq-ckpts --ckpt /tmp/fq-ckpts/llama-3-8b \
            --out "$OUT/load.json" 2>&1 | tail -12 ;;
    e2e) python3 "$FQ_SRC/benchmarks/bench_e2e.py" --out "$OUT/e2e.json" ${E2E_ARGS:-} 2>&1 | tail -30 ;;
    profile)  # PROFILE_ARGS="--shape smollm3-3b": one training step's device time by kernel group
      python3 "$FQ_SRC/benchmarks/profile_step.py" --out "$OUT/profile_step.json" ${PROFILE_ARGS:-} 2>&1 | tail -30 ;;
    families)
      timeout ${TEST_CAP:-300} python3 -m pytest -q -rf -p no:cacheprovider "$FQ_SRC/tests/test_model_kernels.py" \
        "$FQ_SRC/tests/test_models.py" "$FQ_SRC/tests/test_image_text.py" 2>&1 | tail -12 | tee "$OUT/families.log" ;;
    generate)
      timeout ${TEST_CAP:-200} python3 -m pytest -q -rf -p no:cacheprovider -m gpu "$FQ_SRC/tests/test_decode_graph.py" \
        "$FQ_SRC/tests/test_decode_attention.py" "$FQ_SRC/tests/test_thin_matmul.py" "$FQ_SRC/tests/test_generation.py" \
        "$FQ_SRC/tests/test_lora_linear.py" 2>&1 | tail -8 | tee "$OUT/generate_tests.log"
      python3 "$FQ_SRC/benchmarks/bench_generate.py" --out "$OUT/generate.json" \
        ${GEN_ARGS:---shapes llama-3-8b:1,llama-3-8b:8 --systems baseline,ours,ours-graph-dequant,ours-torch-attn} 2>&1 | grep -v Warn | tail -24 ;;
    train-graph)  # the training step as a CUDA graph: its GPU tests, then ours vs ours-graph (GRAPH_ARGS)
      timeout ${TEST_CAP:-200} python3 -m pytest -q -rf -p no:cacheprovider "$FQ_SRC/tests/test_step_graph.py" \
        "$FQ_SRC/tests/test_bench_trainer.py" 2>&1 | tail -8 | tee "$OUT/train_graph_tests.log"
      timeout ${TEST_CAP:-200} python3 -m pytest -q -rf -p no:cacheprovider -m gpu "$FQ_SRC/tests/test_train_loop.py" \
        2>&1 | tail -4 | tee -a "$OUT/train_graph_tests.log"
      python3 "$FQ_SRC/benchmarks/bench_trainer.py" --shape llama-3.2-1b --out "$OUT/trainer.json" 2>&1 | grep -v Warn | tail -4
      python3 "$FQ_SRC/benchmarks/bench_e2e.py" --out "$OUT/e2e_graph.json" --steps 4 \
        ${GRAPH_ARGS:---shapes llama-3.2-1b:2x2048,smollm3-3b:2x2048 --systems ours,ours-graph} 2>&1 | grep -v Warn | tail -12 ;;
    trainers-graph)  # the graphed loss path and graphed backbone: their tests, then eager vs graph under both trainers
      timeout ${TEST_CAP:-200} python3 -m pytest -q -rf -p no:cacheprovider "$FQ_SRC/tests/test_graphed_loss.py" \
        "$FQ_SRC/tests/test_graphed_backbone.py" > "$OUT/trainers_graph_tests.log" 2>&1; tail -3 "$OUT/trainers_graph_tests.log"
      for trainer in transformers trl; do
        timeout ${TEST_CAP:-200} python3 "$FQ_SRC/benchmarks/bench_hf_trainer.py" --trainer $trainer \
          --shape ${TRAINERS_SHAPE:-llama-3.2-1b} --out "$OUT/${trainer}_graph.json" > "$OUT/${trainer}_graph.log" 2>&1
        grep -v Warn "$OUT/${trainer}_graph.log" | tail -3
      done ;;
    decode)
      timeout ${TEST_CAP:-200} python3 -m pytest -q -rf -p no:cacheprovider -m gpu "$FQ_SRC/tests/test_nf4_matmul.py" \
        > "$OUT/decode_tests.log" 2>&1; tail -2 "$OUT/decode_tests.log"
      timeout 300 python3 "$FQ_SRC/benchmarks/sweep_nf4_decode.py" --table --m 1,2,4,8,16 --out "$OUT/nf4_decode_table.json" \
        2>&1 | grep -v Warn | tail -21
      timeout 200 python3 "$FQ_SRC/benchmarks/decode_floor.py" --m 1,2,4,8,16 --out "$OUT/decode_floor.json" 2>&1 | grep -v Warn | tail -24
      # the same with each call reading its own weight copy from HBM, as a model's decode step does
      timeout 200 python3 "$FQ_SRC/benchmarks/decode_floor.py" --hbm --m 1,2,4,8,16 --out "$OUT/decode_floor_hbm.json" 2>&1 | grep -v Warn | tail -24
      timeout 200 python3 "$FQ_SRC/benchmarks/bench_thin_matmul.py" --out "$OUT/thin_matmul.json" 2>&1 | grep -v Warn | tail -21
      if command -v ncu > /dev/null; then
        for spec in ${DECODE_NCU:-}; do  # shape:M:config, e.g. q/o:2:mma:8:1
          shape=${spec%%:*}; rest=${spec#*:}; m=${rest%%:*}; cfg=${rest#*:}
          name=$(echo "$shape-m$m-$cfg" | tr '/:' '__')
          timeout 300 ncu --set full --cache-control none --clock-control none -k regex:"nf4_decode_mma|nf4_gemv|kgemm" -s 5 -c 1 -o "$OUT/ncu_$name" -f \
            python3 "$FQ_SRC/benchmarks/decode_one.py" --shape "$shape" --m "$m" --config "$cfg" > "$OUT/ncu_$name.log" 2>&1
          ncu --import "$OUT/ncu_$name.ncu-rep" --page details --print-details all > "$OUT/ncu_$name.txt" 2>&1
          echo "ncu $spec rc=$?"
        done
        # a device call returns at most 8 files: the profiles' text in one archive, the reports left out
        if ls "$OUT"/ncu_*.txt > /dev/null 2>&1; then
          (cd "$OUT" && tar czf ncu_decode.tgz ncu_*.txt ncu_*.log && rm -f ncu_*.txt ncu_*.log ncu_*.ncu-rep)
        fi
      fi ;;
    *) echo "unknown stage $stage" ;;
  esac
done
