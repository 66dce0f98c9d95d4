# Keep compiled kernels between device machines. MLX compiles each custom kernel with
# NVRTC to PTX (kept under MLX_PTX_CACHE_DIR) and the driver compiles the PTX for the
# GPU (kept under CUDA_CACHE_PATH), both the first time a machine runs that kernel: a
# fresh machine pays them for every variant the GPU tests build (session 16: three
# calls of ~20 test cases each ran into their 5-minute limits, mostly compiling).
#
# On the device, after MLX's set-up:   source scripts/gpu_kernel_cache.sh
# It unpacks .kernel-cache.tgz if the call carried it, and packs both caches into
# $OUT/kernel-cache.tgz when the shell exits. Back here, keep that file as
# .kernel-cache.tgz in the repository root (ignored by git) and carry it next time.
# Entries are keyed by the kernel's text (JANG's include lines name their files by
# content hash), so a changed kernel never reuses a stale entry.
KERNEL_CACHE=$HOME/kernel-cache
mkdir -p "$KERNEL_CACHE/ptx" "$KERNEL_CACHE/nv"
if [ -f .kernel-cache.tgz ]; then
  tar xzf .kernel-cache.tgz -C "$KERNEL_CACHE"
fi
export MLX_PTX_CACHE_DIR=$KERNEL_CACHE/ptx CUDA_CACHE_PATH=$KERNEL_CACHE/nv
if [ -n "${OUT:-}" ]; then
  trap 'tar czf "$OUT/kernel-cache.tgz" -C "$KERNEL_CACHE" .' EXIT
fi
