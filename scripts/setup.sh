# Source this: creates .venv (once) and installs jang with its test extras into it.
# Works on a fresh Linux or macOS machine with python3 >= 3.10.
set -e
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q -e ".[dev,plot]"
# On Debian as root: package lists for apt-get download (Jane Austen's novels, Debian's
# r-cran-janeaustenr, are the tests' real text) and OpenBLAS, which makes MLX's fp32
# CPU matmul ~80x faster when preloaded (MLX's CPU wheel bundles a slow reference BLAS).
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-cache show r-cran-janeaustenr >/dev/null 2>&1 || apt-get update -qq >/dev/null \
    || echo "warning: apt-get update failed; tests that read Jane Austen will fail"
  # a C++ compiler checks the generated Metal kernels' syntax (tests/test_kernels_cpu.py)
  command -v c++ >/dev/null 2>&1 || apt-get install -y -qq g++ >/dev/null || echo "note: no C++ compiler; Metal syntax tests skip"
  [ -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ] || [ "$(uname -m)" != x86_64 ] \
    || apt-get install -y -qq libopenblas0-pthread >/dev/null || echo "note: OpenBLAS not installed; CPU runs slower"
fi
for blas in /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 /usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3; do
  [ -e "$blas" ] && export LD_PRELOAD="$blas${LD_PRELOAD:+:$LD_PRELOAD}" && break
done
set +e
