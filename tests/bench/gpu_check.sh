#!/usr/bin/env bash
# The one prepared device check for a lent GPU (one H200, well under 10 minutes): the CUDA and
# NCCL paths, then R50 PIRL images/s at batch 32 and 64 per GPU option on/off, as JSON under
# $OUT. Not a test and not run by CI (no GPU there); written before any GPU was lent, so its
# first run is also its first test.
#
# The device image has torch but not hydra-core/omegaconf/antlr4. Once, here, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl \
#     hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
# (antlr4 ships an sdist only: if pip refuses, `pip wheel --no-deps antlr4-python3-runtime==4.9.3
# -w .whl` builds its pure-Python wheel). Then, through the device tool:
#   run(command="bash tests/bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# CUDA / NCCL paths: a 1-rank NCCL group (a second rank would need a second GPU), a bank update
# on the GPU, an NCCL all-reduce and an nvJPEG decode; the bench below runs the rest.
timeout 120 python3 - <<'EOF' 2>&1 | tee "$OUT/paths.txt"
import io, os, torch, torch.distributed as dist
from PIL import Image
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29512", RANK="0", WORLD_SIZE="1")
print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())
dist.init_process_group("nccl", device_id=torch.device("cuda:0"))
from pirl.memory import MemoryBank
bank = MemoryBank(1000, 128).cuda()
bank.update(torch.randn(4, 128, device="cuda"), torch.tensor([1, 2, 3, 999], device="cuda"))
x = torch.ones(1 << 20, device="cuda"); dist.all_reduce(x); print("nccl all_reduce ok", x[0].item())
from pirl.device_transforms import decode
buf = io.BytesIO(); Image.new("RGB", (500, 375), (200, 30, 60)).save(buf, "JPEG")
img = decode([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], torch.device("cuda"))[0]
print("nvjpeg decode", tuple(img.shape), img.device, img[:, 0, 0].tolist())
dist.destroy_process_group()
EOF

# images/s per option, alternated in one invocation per batch size (12 loader workers of 16 cores)
for batch in 32 64; do
  timeout 240 python3 -m pirl.tools.throughput --steps 10 --warmup 3 \
    "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=$batch" config.DATA.NUM_DATALOADER_WORKERS=12 \
    --variant "config.MODEL.AMP_PARAMS.USE_AMP=true" \
    --variant "config.MODEL.AMP_PARAMS.USE_AMP=true config.DATA.TRAIN.TRANSFORMS_ON_DEVICE=true" \
    --variant "config.MODEL.AMP_PARAMS.USE_AMP=true config.OPTIMIZER.use_fused=true" \
    --variant "config.MODEL.AMP_PARAMS.USE_AMP=true config.MODEL.CHANNELS_LAST=false" \
    --variant "config.MODEL.CHANNELS_LAST=false" \
    --json "$OUT/bench_b$batch.json" 2>&1 | tail -12 | tee "$OUT/bench_b$batch.txt"
done
