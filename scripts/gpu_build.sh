#!/usr/bin/env bash
# On the lent GPU machine (torch 2.11+cu130, nvcc 13.0, no network): build and install
# fastqlora from this tree for the local GPU only, then put the carried extra packages
# (.devsite: bitsandbytes, trl, datasets) on the path. Source it: `. scripts/gpu_build.sh`.
set -e
export PYTHONUNBUFFERED=1
arch=$(python3 -c "import torch; m,n=torch.cuda.get_device_capability(); print(f'{m}{n}')")
t0=$(date +%s)
# A warm machine keeps what the last call installed: skip the build when the sources are the same.
stamp=$(find csrc python triton_kernels CMakeLists.txt pyproject.toml -type f | sort | xargs sha1sum | sha1sum)
if [ "$(cat /tmp/fq-build.stamp 2>/dev/null)" = "$stamp" ] && python3 -c "import fastqlora._C" 2> /dev/null; then
  echo "fastqlora already built for sm_${arch} from these sources"
else
  CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${arch}" python3 -m pip install -q --no-build-isolation --no-deps . \
    > /tmp/fq-build.log 2>&1 || { tail -40 /tmp/fq-build.log; exit 1; }
  echo "$stamp" > /tmp/fq-build.stamp
  echo "fastqlora built for sm_${arch} in $(( $(date +%s) - t0 )) s"
fi
[ -d .devsite ] && export PYTHONPATH=$PWD/.devsite${PYTHONPATH:+:$PYTHONPATH}
# Run from outside the source tree so `import fastqlora` takes the installed package.
export FQ_SRC=$PWD
set +e
