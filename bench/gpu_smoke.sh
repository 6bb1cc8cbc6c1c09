#!/usr/bin/env bash
# The first run on a lent GPU, as one command: the CUDA paths the CPU suite cannot reach,
# each checked, then a summary table. Sized for < 10 minutes on one H200.
#
#   bash bench/gpu_smoke.sh [OUT_DIR]          # default OUT_DIR: $OUT, else /tmp/gpu_smoke
#
# Parts (each with its own time limit; a part that fails does not stop the others):
#   clip        our clip_grad_norm_ on CUDA gradients vs torch.nn.utils.clip_grad_norm_
#   debug20     20 steps of the debug model, bf16, async checkpoints every 10, the profiler
#               with a memory snapshot on steps 5-6: metrics hold mfu and mem_gb
#   resume      the same run dir to step 25: resumes from step 20
#   compile     compile + selective AC + document masking, 10 steps
#   float8      train.float8=tensorwise, then rowwise, with compile + selective AC, 10 steps each
#   attn        bench/attention_kernels.py: flex vs SDPA vs blockwise under document masks
#               (forward and backward equality against fp32 SDPA, time, memory)
#   speed       bench/train_throughput.py --gpu, the rows that matter most: 1B bf16 MFU at
#               seq 4096, 3B bf16 vs Float8 at 8192, 1B document masks through SDPA vs flex
#   1b-4k       Llama 3.2 1B at seq 4096, 5 steps: memory and MFU
#   sigusr1     SIGUSR1 mid-run: exit 3 and a complete checkpoint
#   bench-*     bench/train_throughput.py --gpu (short), finetune_memory.py --gpu,
#               activation_memory.py --device cuda
#   fsdp2/tp2   2-rank NCCL runs, only when 2+ GPUs are visible
#
# Packages the machine lacks travel as wheels in .whl/ (see /work/.library/device/README.md,
# or any pip download for the machine's Python): installed into /tmp/site when present.
# SMOKE_DRY_RUN=1 runs the same script on CPU with small shapes (checks the script itself).
# SMOKE_PARTS=clip,float8,...: only those parts (default: all). The speed issue's 8-minute
# check: SMOKE_PARTS=clip,compile,float8,attn,speed SMOKE_DEADLINE_S=450.
# SMOKE_DEADLINE_S (570): parts that would start after it are skipped, so the table still
# comes out inside a 10-minute command; each row is written to OUT/summary.txt as it ends.
set -u
OUT=$(realpath -m "${1:-${OUT:-/tmp/gpu_smoke}}")
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
case $OUT in *[,=\'\"\(\)\{\}]*) echo "OUT_DIR must not hold , = ' \" ( ) { }: Hydra reads it"; exit 2;; esac
PY=${PYTHON:-python3}
DEADLINE=$((SECONDS + ${SMOKE_DEADLINE_S:-570}))
export PYTHONUNBUFFERED=1
if [ "${SMOKE_DRY_RUN:-0}" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
if [ "${SMOKE_DRY_RUN:-0}" = 1 ]; then
  DEV=cpu; NGPU=0; SEQ=64; BATCH=2
  BIG=(model=debug model.n_layers=2 model.vocab_size=128256 train.seq_len=128 train.local_batch_size=1)
else
  NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())') || { echo "$PY cannot import torch"; exit 1; }
  DEV=cuda
  [ "$NGPU" -ge 1 ] || { echo "no CUDA device visible to $PY's torch"; exit 1; }
  SEQ=1024; BATCH=8; BIG=(model=llama3_2_1b train.seq_len=4096 train.local_batch_size=2)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
"$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)' | tee "$OUT/versions.txt"
# The debug model with Llama 3's bundled tokenizer (no BPE training on the GPU's time).
DEBUG=(model=debug model.vocab_size=128256 data.tokenizer.kind=llama3 "train.device=$DEV" "train.seq_len=$SEQ"
       "train.local_batch_size=$BATCH" optim.warmup_steps=2)

printf '%-10s %-5s %7s  %s\n' part state time figures >"$OUT/summary.txt"
want() { [ -z "${SMOKE_PARTS:-}" ] || [[ ",$SMOKE_PARTS," == *",$1,"* ]]; }
RC=0
row() {  # NAME STATE SECONDS FIGURES; a part the deadline kept from starting reads "cut"
  if [ "$RC" = 125 ]; then set -- "$1" cut 0 "not started: SMOKE_DEADLINE_S reached"; fi
  printf '%-10s %-5s %6ss  %s\n' "$1" "$2" "$3" "$4" >>"$OUT/summary.txt"
}

# part NAME LIMIT_S CMD...: runs CMD (stdout+stderr to OUT/NAME.log) within LIMIT_S and the
# deadline; sets RC (124: cut off, 125: no time left to start it) and SECS.
part() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((DEADLINE - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    RC=125; SECS=0; echo "no time left for $name" >"$OUT/$name.log"
  else
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    RC=$?; SECS=$((SECONDS - t0))
  fi
  echo "== $name: rc=$RC in ${SECS}s"
}

# metrics RUN_DIR: "steps=.. loss a->b mfu=.. mem_gb=.." from metrics.jsonl, or a reason.
metrics() {
  "$PY" - "$1" <<'PY'
import json, math, sys
rows = {}
try:
    for line in open(sys.argv[1] + "/metrics.jsonl"):
        r = json.loads(line); rows[r["step"]] = r
except OSError as e:
    print(f"no metrics ({e.strerror})"); sys.exit(1)
if not rows:
    print("metrics.jsonl is empty"); sys.exit(1)
last = rows[max(rows)]
ok = all(k in last and math.isfinite(last[k]) for k in ("loss", "mfu", "mem_gb"))
print(f"steps={max(rows)} loss {rows[min(rows)]['loss']:.3f}->{last['loss']:.3f} mfu={last.get('mfu', float('nan')):.3f} "
      f"mem_gb={last.get('mem_gb', float('nan')):.1f} tok/s={last.get('tokens_per_s', 0):.0f}")
sys.exit(0 if ok else 1)
PY
}

if want clip; then
# 1. clipping on CUDA tensors against torch's own
part clip 60 "$PY" - "$DEV" <<'PY'
import copy, sys, torch, torch.nn.functional as F
from parallel.init import clip_grad_norm_
from pretrain.model.llama import build_llama
from pretrain.model.llama.args import LlamaArgs
dev = torch.device(sys.argv[1])
args = LlamaArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=512, vocab_size=1024)
torch.manual_seed(0)
m = build_llama(args, rope_cache_len=64, device=dev); m.init_weights(seed=0)
t = torch.randint(0, 1024, (4, 65), device=dev)
F.cross_entropy(m(t[:, :-1]).flatten(0, 1).float(), t[:, 1:].flatten()).backward()
ref = copy.deepcopy(m)
for p, q in zip(m.parameters(), ref.parameters()):
    q.grad = p.grad.clone()
norm = torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]).item()
got = clip_grad_norm_(list(m.parameters()), norm / 33)
want = torch.nn.utils.clip_grad_norm_(ref.parameters(), norm / 33)
diff = max((p.grad - q.grad).abs().max().item() for p, q in zip(m.parameters(), ref.parameters()))
print(f"norm {got.item():.6g} vs torch {want.item():.6g}; max |clipped grad diff| {diff:.2e}")
sys.exit(0 if torch.equal(got, want) and diff == 0 else 1)
PY
row clip "$([ $RC = 0 ] && echo ok || echo FAIL)" "$SECS" "$(tail -1 "$OUT/clip.log")"
fi

if want debug20; then
# 2. debug model, bf16 (auto on CUDA), async checkpoints, profiler + memory snapshot
RUN=$OUT/run_debug; rm -rf "$RUN"
part debug20 150 "$PY" -m pretrain "${DEBUG[@]}" train.steps=20 checkpoint.interval=10 checkpoint.async_save=true \
  profiling.enable=true profiling.start_step=5 profiling.steps=2 profiling.memory=true logging.every=5 \
  "hydra.run.dir=$RUN"
M=$(metrics "$RUN"); MRC=$?
PROF=$(ls "$RUN/profile" 2>/dev/null | tr '\n' ' ')
ok=$([ $RC = 0 ] && [ $MRC = 0 ] && [ -d "$RUN/checkpoints/step-20" ] && echo ok || echo FAIL)
row debug20 "$ok" "$SECS" "$M | ckpts: $(ls "$RUN/checkpoints" 2>/dev/null | tr '\n' ' ')| profile: $PROF"

# 3. resume from step 20
part resume 120 "$PY" -m pretrain "${DEBUG[@]}" train.steps=25 checkpoint.interval=10 checkpoint.async_save=true \
  logging.every=5 "hydra.run.dir=$RUN"
ok=$([ $RC = 0 ] && grep -q "resumed from step 20" "$OUT/resume.log" && echo ok || echo FAIL)
row resume "$ok" "$SECS" "$(grep -o 'resumed from step [0-9]*' "$OUT/resume.log" | head -1) | $(metrics "$RUN")"
fi

if want compile; then
# 4. compile + selective AC + document masking
RUN=$OUT/run_compile; rm -rf "$RUN"
part compile 240 "$PY" -m pretrain "${DEBUG[@]}" train.steps=10 parallel.compile=true \
  parallel.activation_checkpoint=selective_op data.document_masking=true logging.every=5 "hydra.run.dir=$RUN"
M=$(metrics "$RUN"); MRC=$?
ok=$([ $RC = 0 ] && [ $MRC = 0 ] && echo ok || echo FAIL)
row compile "$ok" "$SECS" "$M | $(grep -o 'compiled [0-9]*' "$OUT/compile.log" | head -1), $(grep -o 'graphs built: [0-9]*' "$OUT/compile.log")"
fi

if want float8; then
# 4b. Float8 (torchao) with compile + selective AC: tensorwise, then rowwise
for recipe in tensorwise rowwise; do
  RUN=$OUT/run_float8_$recipe; rm -rf "$RUN"
  part "f8-$recipe" 200 "$PY" -m pretrain "${DEBUG[@]}" train.steps=10 "train.float8=$recipe" parallel.compile=true \
    parallel.activation_checkpoint=selective_op logging.every=5 "hydra.run.dir=$RUN"
  M=$(metrics "$RUN"); MRC=$?
  ok=$([ $RC = 0 ] && [ $MRC = 0 ] && grep -q "float8 linears [1-9]" "$OUT/f8-$recipe.log" && echo ok || echo FAIL)
  row "f8-$recipe" "$ok" "$SECS" "$M | $(grep -o 'float8 linears [0-9]*' "$OUT/f8-$recipe.log" | head -1)"
done
fi

if want attn; then
# 4c. document-masked attention: flex vs SDPA (dense mask) vs blockwise, equality and speed
if [ "$DEV" = cuda ]; then ATTN=(); else ATTN=(--device cpu --seqs 256 --iters 1 --warmup 0); fi
part attn 150 "$PY" bench/attention_kernels.py "${ATTN[@]}"
row attn "$([ $RC = 0 ] && echo ok || echo FAIL)" "$SECS" "$(tail -1 "$OUT/attn.log" | cut -c1-400)"
fi

if want speed; then
# 4d. tokens/s and MFU: 1B bf16 at 4096, 3B bf16 vs Float8 at 8192, flex vs SDPA document masks
if [ "$DEV" = cuda ]; then
  part speed 420 "$PY" bench/train_throughput.py --gpu --gpu-steps 5 --gpu-warmup 2 --gpu-max-batch 8 \
    --gpu-rows "${SPEED_ROWS:-1b-4k-sac,3b-8k-sac,3b-8k-sac-f8,1b-4k-docs-sdpa,1b-4k-docs-flex}"
  row speed "$([ $RC = 0 ] && echo ok || echo FAIL)" "$SECS" "$(grep -E 'x tokens/s' "$OUT/speed.log" | tr '\n' ' ')"
else
  RC=0; row speed skip 0 "needs CUDA"
fi
fi

if want 1b-4k; then
# 5. Llama 3.2 1B at seq 4096
RUN=$OUT/run_1b; rm -rf "$RUN"
part 1b-4k 240 "$PY" -m pretrain "${BIG[@]}" "train.device=$DEV" data.tokenizer.kind=llama3 train.steps=5 \
  logging.every=1 "hydra.run.dir=$RUN"
M=$(metrics "$RUN"); MRC=$?
row 1b-4k "$([ $RC = 0 ] && [ $MRC = 0 ] && echo ok || echo FAIL)" "$SECS" "$M"
fi

if want sigusr1; then
# 6. SIGUSR1: checkpoint at the next step boundary, exit 3 (the run is killed if it has not
# ended 120 s after the signal, or by the deadline)
RUN=$OUT/run_usr1; rm -rf "$RUN"
t0=$SECONDS
"$PY" -m pretrain "${DEBUG[@]}" train.steps=100000 logging.every=1 "hydra.run.dir=$RUN" >"$OUT/sigusr1.log" 2>&1 &
PID=$!
trap 'kill -9 $PID 2>/dev/null' EXIT
until { [ -f "$RUN/metrics.jsonl" ] && [ "$(wc -l <"$RUN/metrics.jsonl")" -ge 3 ]; } \
    || ! kill -0 $PID 2>/dev/null || [ $SECONDS -ge $((t0 + 180)) ] || [ $SECONDS -ge $DEADLINE ]; do sleep 0.5; done
kill -USR1 $PID 2>/dev/null
stop=$((SECONDS + 120))
while kill -0 $PID 2>/dev/null && [ $SECONDS -lt $stop ] && [ $SECONDS -lt $DEADLINE ]; do sleep 0.5; done
kill -9 $PID 2>/dev/null
wait $PID; RC=$?
CK=$(ls "$RUN/checkpoints" 2>/dev/null | grep -v partial | tr '\n' ' ')
row sigusr1 "$([ $RC = 3 ] && [ -n "$CK" ] && echo ok || echo FAIL)" "$((SECONDS - t0))" "exit $RC, checkpoints: $CK"
fi

if want bench; then
# 7. the benchmarks, short
if [ "$DEV" = cuda ]; then
  part bench-tput 180 "$PY" bench/train_throughput.py --gpu --gpu-steps 3 --gpu-warmup 1 --gpu-max-batch 4 \
    --gpu-rows 1b-4k-eager,1b-4k
  row bench-tput "$([ $RC = 0 ] && echo ok || echo FAIL)" "$SECS" "$(tail -1 "$OUT/bench-tput.log")"
  part bench-ft 120 "$PY" bench/finetune_memory.py --gpu
  row bench-ft "$([ $RC = 0 ] && echo ok || echo FAIL)" "$SECS" "$(tail -1 "$OUT/bench-ft.log")"
  part bench-act 120 "$PY" bench/activation_memory.py --device cuda
  row bench-act "$([ $RC = 0 ] && echo ok || echo FAIL)" "$SECS" "$(tail -1 "$OUT/bench-act.log")"
fi
fi

if want nccl; then
# 8. multi-rank NCCL, when there are GPUs for it
if [ "$NGPU" -ge 2 ]; then
  for layout in "fsdp2:parallel=fsdp" "tp2:parallel.tp=2 parallel.dp_shard=1 parallel.loss_parallel=true"; do
    name=${layout%%:*}; RUN=$OUT/run_$name; rm -rf "$RUN"
    # shellcheck disable=SC2086
    part "$name" 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m pretrain "${DEBUG[@]}" \
      train.steps=10 logging.every=5 ${layout#*:} "hydra.run.dir=$RUN"
    M=$(metrics "$RUN"); MRC=$?
    row "$name" "$([ $RC = 0 ] && [ $MRC = 0 ] && echo ok || echo FAIL)" "$SECS" "$M"
  done
else
  RC=0; row nccl skip 0 "1 GPU visible: the 2-rank NCCL parts need 2+"
fi
fi

echo
cat "$OUT/summary.txt"
! grep -q -E ' (FAIL|cut) ' "$OUT/summary.txt"
