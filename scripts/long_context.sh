#!/usr/bin/env bash
# The long-context target of the offload issue: one training step of Llama-3-8B (4-bit,
# offload, batch 1) at 393,216 tokens with GPU memory capped at 79 GiB (an 80 GB H100's
# share). One step takes longer than one 10-minute device call, so the run is started in
# its own process session (it outlives the call that started it while the machine stays
# warm) and a later call waits for it.
#   bash scripts/long_context.sh start            # after `. scripts/gpu_build.sh`
#   bash scripts/long_context.sh wait 570         # poll up to 570 s; copies results to $OUT
set -u
OUT=${OUT:-$PWD/out}
DIR=/tmp/fq-long
SEQ=${SEQ:-393216}
case ${1:-} in
  start)
    mkdir -p "$DIR"; rm -f "$DIR"/rc "$DIR"/result.json
    # the whole slab on the host: 31 layers x 393,216 tokens x 8 KiB = 93 GiB pinned (the VM's
    # MemAvailable starts low and grows as memory is touched, so the budget is given)
    export FASTQLORA_OFFLOAD_HOST_BYTES=${FASTQLORA_OFFLOAD_HOST_BYTES:-100G}
    setsid nohup bash -c "python3 benchmarks/bench_offload.py --gpu-gib 79 longest --modes offload \
        --start $SEQ --max $SEQ --bisect 0 --trial-timeout 1700 --ckpt /tmp/fq-ckpts/llama-3-8b \
        --out $DIR/result.json > $DIR/log 2>&1; echo \$? > $DIR/rc" < /dev/null > /dev/null 2>&1 &
    echo "started the $SEQ-token step at $(date +%T)" ;;
  wait)
    limit=${2:-570}; t0=$(date +%s)
    while [ ! -f "$DIR/rc" ] && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do
      sleep 15
      nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
      free -g | sed -n 2p
    done
    mkdir -p "$OUT"; cp "$DIR"/log "$DIR"/result.json "$DIR"/rc "$OUT"/ 2>/dev/null
    if [ -f "$DIR/rc" ]; then echo "finished rc=$(cat $DIR/rc)"; tail -5 "$DIR/log"; else echo "still running"; fi ;;
  *) echo "usage: $0 start | wait [seconds]"; exit 2 ;;
esac
