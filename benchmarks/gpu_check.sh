#!/usr/bin/env bash
# Does crossdiff's GPU path work? CI has no GPU, so this runs on a lent CUDA machine that has PyTorch
# but no network: `prepare` (here, with network) puts the missing wheels in .whl/ and a NIfTI-only copy
# of the sarcoma data in .gpu/data/ (both git-ignored, ~46 MB); `run` (there, from the repo root,
# with .whl and .gpu carried) checks, writing its files to $OUT:
#   1. the quick benchmark with training and inference on CUDA (cost.csv: CUDA peak memory);
#   2. the demo model's config trained on CUDA in fp16 (autocast + GradScaler): same validation as CPU?
#   3. `crossdiff demo --device cuda` with 8, 32 and 128 draws: same sCT as on CPU? does the MC mean move?
# Results: benchmarks/results/gpu-check/ (README.md there says what was seen).
# Usage:  bash benchmarks/gpu_check.sh prepare        (here)
#         bash benchmarks/gpu_check.sh setup benchmark demo   and   ... setup training   (there: each
#         call has 10 minutes; `setup` installs the carried wheels, the others are the checks 1-3)
set -uo pipefail
WHEELS=(monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2)

prepare() {
    local data=../shared/data/sarcoma-ct-mr-pet copy=.gpu/data/sarcoma-ct-mr-pet
    local exclude; exclude="$(git rev-parse --git-dir)/info/exclude"
    mkdir -p "$(dirname "$exclude")" && grep -qx '/.whl/' "$exclude" 2>/dev/null || printf '/.whl/\n/.gpu/\n' >> "$exclude"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}" simpleitk==2.5.7 || exit 1
    # SimpleITK's wheel (53 MB) would not fit the 64 MB that travels: repacked with xz (29 MB)
    mkdir -p /tmp/sitk && unzip -q -o .whl/simpleitk-*.whl -d /tmp/sitk && tar -cJf .whl/sitk.tar.xz -C /tmp/sitk . \
        && rm -rf /tmp/sitk .whl/simpleitk-*.whl
    for case in STS_001 STS_002 STS_003; do
        for modality in CT MR_T1; do mkdir -p "$copy/$case/$modality" && cp -r "$data/$case/$modality/nifti" "$copy/$case/$modality/"; done
    done
    cp "$data/README.md" "$data/LICENSE.md" "$copy/"
}

setup() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && tar -xJf .whl/sitk.tar.xz -C /tmp/site || exit 1
    export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
    python3 -c "import torch, monai; print(torch.__version__, monai.__version__, torch.cuda.get_device_name())" || exit 1
}

benchmark() {
    python3 -m crossdiff benchmark --config benchmarks/configs/gpu/quick-cuda.yaml --out /tmp/bq 2>&1 | tail -8
    cp /tmp/bq/{cost,speed,results}.csv "$OUT/"
}

training() {
    python3 benchmarks/train_demo_model.py --config benchmarks/configs/gpu/demo-model-cuda-fp16.yaml \
        --data .gpu/data/sarcoma-ct-mr-pet --out /tmp/model-fp16 > /dev/null
    cp /tmp/model-fp16/training-record.json "$OUT/fp16-training-record.json"
}

demo() {
    for draws in 8 32 128; do
        /usr/bin/time -f "%e s wall" python3 -m crossdiff demo --device cuda --samples "$draws" --out "/tmp/demo$draws" 2>&1 | grep -E "MAE|wall"
        cp "/tmp/demo$draws/summary.json" "$OUT/demo-summary-$draws.json"
    done
}

[ $# -gt 0 ] || { echo "usage: gpu_check.sh prepare | setup [benchmark] [training] [demo]" >&2; exit 2; }
for step in "$@"; do "$step" || exit 1; done
