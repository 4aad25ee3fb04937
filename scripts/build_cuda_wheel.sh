#!/usr/bin/env bash
# Build the CUDA variant of the pinned llama-cpp-python for the lent H100 or H200 (sm_90), here, once.
#
# The device machine has nvcc but no network and a 10-minute command limit, and the source
# distribution alone is 73 MB: it cannot travel, and compiling there would spend the lease. This
# machine has the CUDA 13 compiler and runtime but no cuBLAS, so cuBLAS's headers and libraries
# come from PyPI's nvidia-cublas wheel (the CUDA 13 one). The wheel links libcublas.so.13 and
# libcudart.so.13 by SONAME; on the device bench/device_check.sh puts the nvidia-* Python
# packages' lib folders on LD_LIBRARY_PATH (those packages are installed there).
#
# Usage: scripts/build_cuda_wheel.sh [--cached-only]   (prints the wheel's path last; --cached-only:
#        print it if it is cached, else exit 3 without building)
# Env:   WHEEL_CACHE  cache root (default ~/.cache/dragon-llm-extractor/wheels, as scripts/setup.sh)
#        CUDA_ARCH    CMAKE_CUDA_ARCHITECTURES (default 90: H100/H200)
#        JOBS         parallel compile jobs (default: nproc)
#
# Run it under `nice -n 19` on a shared machine: it takes tens of minutes on 2 cores.
# -DGGML_CUDA_FA=OFF leaves out llama.cpp's flash-attention kernels (a large share of the compile
# and of the library): the engine never uses them, extractor/llama_api.py sets
# flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED for every context.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

py=".venv/bin/python"
[[ -x "${py}" ]] || py=python3
llama_version="$(sed -n 's/^llama-cpp-python==//p' requirements.txt)"
readonly CUBLAS_VERSION="13.0.2.14"  # cuBLAS of CUDA 13.0, the toolkit here (nvcc 13.0.88) and on the device
arch="${CUDA_ARCH:-90}"
cache_root="${WHEEL_CACHE:-${HOME}/.cache/dragon-llm-extractor/wheels}"
flags="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${arch} -DGGML_NATIVE=OFF -DGGML_CUDA_FA=OFF"
key="$(printf '%s %s cublas-%s' "${llama_version}" "${flags}" "${CUBLAS_VERSION}" | sha256sum | cut -c1-16)"
wheel_dir="${cache_root}/llama-cpp-python-${llama_version}-cuda-${key}"

if compgen -G "${wheel_dir}/llama_cpp_python-*.whl" >/dev/null; then
    echo "build_cuda_wheel: cached ($(cat "${wheel_dir}/build-info.txt" 2>/dev/null))" >&2
    ls "${wheel_dir}"/llama_cpp_python-*.whl
    exit 0
fi
if [[ "${1:-}" == --cached-only ]]; then
    echo "build_cuda_wheel: no cached CUDA wheel in ${wheel_dir}" >&2
    exit 3
fi

command -v nvcc >/dev/null || { echo "build_cuda_wheel: nvcc is not on the PATH (a CUDA 13 toolkit is needed)" >&2; exit 1; }
nvcc_bin="$(command -v nvcc)"

src_cache="${cache_root}/src"
mkdir -p "${src_cache}"
pipd() { "${py}" -m pip download --quiet --disable-pip-version-check --no-deps -d "${src_cache}" "$@"; }

sdist="$(find "${src_cache}" -maxdepth 1 -name "llama_cpp_python-${llama_version}.tar.gz" -print -quit)"
if [[ -z "${sdist}" ]]; then
    pipd --no-binary=:all: "llama-cpp-python==${llama_version}"
    sdist="$(find "${src_cache}" -maxdepth 1 -name "llama_cpp_python-${llama_version}.tar.gz" -print -quit)"
fi
cublas_whl="$(find "${src_cache}" -maxdepth 1 -name "nvidia_cublas-${CUBLAS_VERSION}-*.whl" -print -quit)"
if [[ -z "${cublas_whl}" ]]; then
    pipd --only-binary=:all: --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
        --python-version 3.12 "nvidia-cublas==${CUBLAS_VERSION}"
    cublas_whl="$(find "${src_cache}" -maxdepth 1 -name "nvidia_cublas-${CUBLAS_VERSION}-*.whl" -print -quit)"
fi

cublas_root="${src_cache}/nvidia-cublas-${CUBLAS_VERSION}"
if [[ ! -d "${cublas_root}" ]]; then
    "${py}" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "${cublas_whl}" "${cublas_root}.tmp"
    mv "${cublas_root}.tmp" "${cublas_root}"
fi
cublas_h="$(find "${cublas_root}" -name cublas_v2.h -print -quit)"
cublas_so="$(find "${cublas_root}" -name 'libcublas.so.*' -print -quit)"
cublaslt_so="$(find "${cublas_root}" -name 'libcublasLt.so.*' -print -quit)"
[[ -n "${cublas_h}" && -n "${cublas_so}" && -n "${cublaslt_so}" ]] || {
    echo "build_cuda_wheel: ${cublas_whl} lacks cublas_v2.h or libcublas(Lt).so.*" >&2
    exit 1
}
inc="$(dirname "${cublas_h}")"
lib="$(dirname "${cublas_so}")"

# The toolkit here has no driver stub (lib64/stubs/libcuda.so) either, and ggml-cuda links
# CUDA::cuda_driver. An empty library with the driver's SONAME is enough to link a shared library
# (its cu* symbols stay undefined and the real driver's libcuda.so.1 resolves them at load time).
stub_dir="${src_cache}/libcuda-stub"
if [[ ! -f "${stub_dir}/libcuda.so" ]]; then
    mkdir -p "${stub_dir}"
    echo 'void dragon_libcuda_stub(void) {}' >"${stub_dir}/stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "${stub_dir}/libcuda.so" "${stub_dir}/stub.c"
fi

# FindCUDAToolkit takes a preset CUDA_<lib>_LIBRARY as found; the headers come in through -I.
cmake_args="${flags} -DCMAKE_CUDA_COMPILER=${nvcc_bin} -DCUDA_cuda_driver_LIBRARY=${stub_dir}/libcuda.so"
cmake_args+=" -DCUDA_cublas_LIBRARY=${cublas_so} -DCUDA_cublasLt_LIBRARY=${cublaslt_so}"
cmake_args+=" -DCMAKE_CUDA_FLAGS=-I${inc} -DCMAKE_CXX_FLAGS=-I${inc} -DCMAKE_C_FLAGS=-I${inc}"
# --no-as-needed keeps libcuda.so.1 in DT_NEEDED although the stub defines none of its symbols
# (the first build lost it; make_device_kit.sh's patchelf step adds it back to such a wheel).
cmake_args+=" -DCMAKE_SHARED_LINKER_FLAGS=-Wl,-rpath-link,${lib},--no-as-needed"

tmp_out="${wheel_dir}.tmp"
rm -rf "${tmp_out}"
mkdir -p "${tmp_out}"
echo "build_cuda_wheel: building llama-cpp-python ${llama_version} for sm_${arch} (${flags})" >&2
start=$(date +%s)
CMAKE_ARGS="${cmake_args}" CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-$(nproc)}" \
    "${py}" -m pip wheel --disable-pip-version-check --no-cache-dir --no-deps -v \
    "${sdist}" -w "${tmp_out}" </dev/null >"${tmp_out}.log" 2>&1 || {
    tail -40 "${tmp_out}.log" >&2
    exit 1
}
end=$(date +%s)
wheel="$(find "${tmp_out}" -maxdepth 1 -name 'llama_cpp_python-*.whl' -print -quit)"
"${py}" -c 'import sys, zipfile; sys.exit(not any("libggml-cuda" in n for n in zipfile.ZipFile(sys.argv[1]).namelist()))' \
    "${wheel}" || { echo "build_cuda_wheel: the wheel has no libggml-cuda" >&2; exit 1; }
mv "${tmp_out}" "${wheel_dir}"
mv "${tmp_out}.log" "${wheel_dir}/build.log"
wheel="${wheel_dir}/$(basename "${wheel}")"
size=$(stat -c %s "${wheel}")
printf 'build_seconds=%s wheel_bytes=%s nproc=%s flags=%s\n' "$((end - start))" "${size}" "$(nproc)" "${flags}" \
    >"${wheel_dir}/build-info.txt"
echo "build_cuda_wheel: built in $((end - start)) s, $((size / 1048576)) MiB" >&2
echo "${wheel}"
