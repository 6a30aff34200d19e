#!/bin/bash
# Device run of benchmarks/gpu.py (issue 8 figures), prepared on the CPU host.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee $OUT/nvsmi.txt
python3 -c "import torch,transformers,sys;print('python',sys.version.split()[0],'torch',torch.__version__,'transformers',transformers.__version__,torch.cuda.get_device_name())" | tee $OUT/versions.txt
echo "git: $(git rev-parse HEAD 2>&1 | head -1)"
timeout 200 python3 benchmarks/gpu.py --out $OUT/gpu.json --bundled "" --repeats 5 --replay-profile .devrun/smollm2_profile.json > $OUT/gpu.log 2>&1
echo "default rc $? at ${SECONDS}s"; tail -32 $OUT/gpu.log
