#!/usr/bin/env bash
# The GPU throughput figures of docs/benchmarks.md (On a GPU): linewatch bench on one CUDA device,
# ViT-L-14-336 at 518 px, in three runs that each end on their own time limit, so a slow or
# failing part never costs the others. Weights: random (speed is real, scores mean nothing)
# unless LINEWATCH_WEIGHTS names a weights file. Needs linewatch importable (pip install -e .).
#
#   bash scripts/gpu_bench.sh OUT_DIR [PART ...]     PART: env aprilgan winclip compiled kanoclip bagclip
#                                                    (default: env aprilgan winclip compiled)
#
# OUT_DIR gets env.txt (GPU, driver, library versions), weights.txt (any CLIP weights found in
# the usual caches) and per run NAME.json (the report), NAME.txt (the table) and NAME.err (log).
# ARCH, SIZE and DEVICE override the model, image size and device (a CPU rehearsal of the flags:
# ARCH=linewatch-tiny SIZE=64 DEVICE=cpu).
set -uo pipefail
out=${1:?usage: bash scripts/gpu_bench.sh OUT_DIR [env aprilgan winclip compiled]}
shift
parts=" ${*:-env aprilgan winclip compiled} "
mkdir -p "$out"
export PYTHONUNBUFFERED=1
common=(--arch "${ARCH:-ViT-L-14-336}" --image-size "${SIZE:-518}" --device "${DEVICE:-cuda}"
        --weights "${LINEWATCH_WEIGHTS:-none}" --no-progress)

[[ $parts == *" env "* ]] && {
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import sys, torch, torchvision, open_clip, cv2; print(sys.version.split()[0], 'torch', torch.__version__,
'torchvision', torchvision.__version__, 'open_clip', open_clip.__version__, 'cv2', cv2.__version__,
torch.cuda.get_device_name(), 'bf16', torch.cuda.is_bf16_supported()); from torchvision.io import decode_jpeg; print('nvjpeg import ok')"
    nproc
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

# Pretrained CLIP weights on this machine? (Hugging Face / torch / open_clip caches, then any large file.)
{
    env | grep -E '^(HF_|HUGGINGFACE|TORCH_HOME|XDG_CACHE|OPENCLIP)' || true
    for dir in "${HF_HOME:-$HOME/.cache/huggingface}" "${TORCH_HOME:-$HOME/.cache/torch}" "$HOME/.cache/clip" \
               "$HOME/.cache/open_clip" /root/.cache /models /data /opt/models; do
        [ -e "$dir" ] && { echo "-- $dir"; ls -la "$dir" | head -30; }
    done
    echo "-- files over 100 MB named like model weights, anywhere on this disk:"
    timeout 20 find / -xdev -type f \( -name '*.safetensors' -o -name '*.bin' -o -name '*.pt' -o -name '*.pth' \
        -o -name '*.ckpt' -o -name '*.npz' \) -size +100M 2>/dev/null | head -40
    echo "-- any path naming clip or siglip (first 40):"
    timeout 20 find / -xdev \( -iname '*clip*' -o -iname '*siglip*' \) -not -path '*/site-packages/*' \
        -not -path '/proc/*' -not -path "$PWD/*" -not -path '/tmp/*' 2>/dev/null | head -40
} >"$out/weights.txt" 2>&1
echo "weights search: $(wc -l <"$out/weights.txt") lines in weights.txt"
}

bench() {  # NAME SECONDS ARGS...: one linewatch bench run under its own time limit
    local name=$1 limit=$2
    shift 2
    [[ $parts == *" $name "* ]] || return 0
    echo "== $name (limit ${limit} s): linewatch bench ${common[*]} $*"
    local began=$SECONDS
    timeout -k 15 "$limit" python3 -m linewatch bench "${common[@]}" "$@" --json "$out/$name.json" \
        >"$out/$name.txt" 2>"$out/$name.err"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - began)) s"
    sed -n '1,/^JSON:/p' "$out/$name.txt" | grep -v '^JSON:'
    [ "$rc" -eq 0 ] || tail -n 25 "$out/$name.err"
}

# 1. APRIL-GAN: the baseline loop, the sweep over batch x precision, both pipelines, ingest.
bench aprilgan 240 --methods aprilgan --frames 512 --naive-frames 8 --sweep-frames 128 --sweep-seconds 2 \
    --batch-sizes 8,16,32,64 --precisions bf16,fp16,fp32 --repeats 3
# 2. WinCLIP: ~14x APRIL-GAN's tokens per frame (its window passes), so fewer frames.
bench winclip 150 --methods winclip --frames 64 --naive-frames 4 --sweep-frames 32 --sweep-seconds 2 \
    --batch-sizes 8,16 --precisions bf16,fp32 --repeats 2 --no-kafka
# 4. (asked by name) KAnoCLIP beside APRIL-GAN in one run, both on the V-V backbone KAnoCLIP needs.
bench kanoclip 300 --methods kanoclip,aprilgan --vv-attention --frames 512 --naive-frames 8 --sweep-frames 128 \
    --sweep-seconds 2 --batch-sizes 8,16,32,64 --precisions bf16,fp32 --repeats 3
# 3. torch.compile'd blocks against eager at one batch size (compiling takes a while: last).
bench compiled 180 --methods aprilgan --frames 256 --naive-frames 2 --sweep-frames 128 --sweep-seconds 2 \
    --batch-sizes 64 --precisions bf16 --compile --no-pipelines --repeats 1
# 5. BAG-CLIP beside APRIL-GAN (issue 16), only when named: batch 1 is the paper's setting (121.6 ms,
#    8.2 FPS per 518-px image on an A6000), then the graph's own cost at 196, 1024 and 1369 nodes.
bench bagclip 300 --methods bag-clip,aprilgan --frames 256 --naive-frames 4 --sweep-frames 64 --sweep-seconds 2 \
    --batch-sizes 1,8,32 --precisions bf16,fp32 --repeats 2 --no-kafka
if [[ $parts == *" bagclip "* ]]; then
    for dtype in bf16 fp32; do
        timeout -k 15 120 python3 scripts/graph_bench.py --device "${DEVICE:-cuda}" --dtype "$dtype" \
            --nodes 196 1024 1369 --repeats 50 --json "$out/graph-$dtype.json" >"$out/graph-$dtype.txt" 2>&1
        echo "== graph ($dtype): exit $?"
        tail -n 5 "$out/graph-$dtype.txt"
    done
fi
