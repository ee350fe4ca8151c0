#!/usr/bin/env bash
# The selection and prefill benchmarks on one CUDA GPU in one call, each table written to OUT_DIR.
#
#   eval/gpu_benchmarks.sh OUT_DIR                       # CUDA, bfloat16 (float32 too for selection); < 9 min on an H100
#   eval/gpu_benchmarks.sh OUT_DIR --device cpu --quick  # the same steps at toy sizes: checks the script here
#
# Steps (each under its own time limit, 520 s in all, so a slow step cannot eat the others' time; one that runs out leaves
# its partial table and a line in OUT_DIR/steps.txt):
#   selection_vs_papers.md  DivPrune and MMTok against the papers' formulations (eval/bench_selection.py): N in
#                           {576, 1752, 2880}, D in {1024, 4096}, k in {64, 10 %}, bfloat16 and float32, batch 1 and 8
#   selection_shares.md     every greedy strategy's selection as a share of a 7B-shaped prefill (--shares)
#   prefill_<class>_<attention>_b<batch>.md
#                           eval/bench_prefill.py on random-weight decoders of LLaVA-1.5-7B's and Qwen2.5-VL-7B's
#                           shapes (real width, heads, MLP and depth; small vision towers: images are encoded before
#                           the timed prefill), bfloat16, SDPA, and FlashAttention-2 where flash_attn is installed;
#                           batch 1 and 8 (every sample its own keep set)
#   prefill_profile_qwen2_5_vl.md
#                           last: bench_prefill --profile at keep 11 % on the Qwen2.5-VL-7B shape (where the time goes)
# Timing: both scripts synchronise the device before and after every timed call (torch.cuda.synchronize), interleave
# the variants and report medians / minima. vtprune's own "hooks" and "selection" columns are host-side times, which
# on a GPU include the kernels only where the hooks synchronise.
set -euo pipefail

out=${1:?usage: eval/gpu_benchmarks.sh OUT_DIR [--device cpu|cuda] [--quick]}
shift
device=cuda
quick=0
while (($#)); do
    case $1 in
        --device) device=$2; shift 2 ;;
        --quick) quick=1; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$out"
steps=$out/steps.txt
: >"$steps"

# step NAME LIMIT_S COMMAND...: run COMMAND with its output in OUT_DIR/NAME, noting its wall time and exit status.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS status=0
    echo "# $*" >"$out/$name"
    timeout "$limit" "$@" 2>"$out/$name.log" | grep -v '^USDT' >>"$out/$name" || status=$?
    echo "$name: exit $status after $((SECONDS - start)) s (limit $limit s): $*" | tee -a "$steps"
}

{
    date -u
    git rev-parse --short HEAD 2>/dev/null || true
    python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    if [[ $device == cuda ]]; then nvidia-smi || true; else uptime; fi
} >"$out/machine.txt" 2>&1

attentions=(sdpa)
if [[ $device == cuda ]] && python -c "import flash_attn" 2>/dev/null; then attentions+=(flash_attention_2); fi

if ((quick)); then
    step selection_vs_papers.md 300 python eval/bench_selection.py --device "$device" --quick --sizes 576 \
        --widths 1024 --dtypes bfloat16 float32 --batches 1 2 --repeats 2
    step selection_shares.md 300 python eval/bench_selection.py --device "$device" --shares --sizes 576 --batch 2 \
        --dtypes float32 --repeats 1 --strategies divprune mmtok
    for kind in llava qwen2_5_vl; do
        for batch in 1 2; do
            step "prefill_${kind}_sdpa_b$batch.md" 300 python eval/bench_prefill.py --device "$device" --kinds "$kind" \
                --layers 2 --batch "$batch" --repeats 1 --warmup 0 --schedules uniform:11% divprune:11% --profile
        done
    done
    exit 0
fi

step selection_vs_papers.md 120 python eval/bench_selection.py --device "$device" --sizes 576 1752 2880 \
    --widths 1024 4096 --dtypes bfloat16 float32 --batches 1 8 --repeats 7
step selection_shares.md 40 python eval/bench_selection.py --device "$device" --shares --dtypes bfloat16 \
    --repeats 5 --strategies uniform fastv divprune todre mmtok cdpruner trim
schedules=(uniform:25% uniform:11% divprune:25% divprune:11% mmtok:11% fastv@2:25%)
# Most important first: SDPA at batch 1 and 8, then FlashAttention at batch 1.
for attention in "${attentions[@]}"; do
    batches=(1 8)
    [[ $attention == sdpa ]] || batches=(1)
    for batch in "${batches[@]}"; do
        for model in llava:llava-1.5-7b qwen2_5_vl:qwen2.5-vl-7b; do
            step "prefill_${model%%:*}_${attention}_b$batch.md" 50 python eval/bench_prefill.py --device "$device" \
                --dtype bfloat16 --kinds "${model%%:*}" --shape "${model#*:}" --attn "$attention" --batch "$batch" \
                --repeats 5 --warmup 2 --schedules "${schedules[@]}"
        done
    done
done
# Last: where the time goes at keep 11 % on the Qwen2.5-VL-7B shape (--profile: device time of the model's ops by kind,
# and of the kernels inside vtprune's own ranges).
step prefill_profile_qwen2_5_vl.md 60 python eval/bench_prefill.py --device "$device" --dtype bfloat16 --kinds qwen2_5_vl \
    --shape qwen2.5-vl-7b --repeats 3 --warmup 1 --schedules uniform:11% divprune:11% --profile
