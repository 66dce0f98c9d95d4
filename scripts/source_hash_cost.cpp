// What MLX's CUDA custom kernels pay per launch for their source size: eval_gpu hashes
// the whole source string (std::hash<std::string>) to name the JIT module, every launch.
// Host-only; any C++17 compiler:
//   g++ -O2 scripts/source_hash_cost.cpp -o /tmp/hash_cost && /tmp/hash_cost
// Sizes: the kernel sources as dialect.source builds them (header + body), e.g. the
// tensor-core o_proj kernel 12.4 KB before session 5's #ifdef stripping, 7.7 KB after.
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>

int main() {
  for (int n : {2000, 5000, 8000, 12000}) {
    std::string s(n, 'a');
    for (int i = 0; i < n; i++) s[i] = 'a' + (i * 7) % 26;
    size_t acc = 0;
    const int reps = 100000;
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; i++) {
      s[i % n] ^= 1;  // a changing string: nothing to cache
      acc += std::hash<std::string>{}(s);
    }
    auto t1 = std::chrono::steady_clock::now();
    std::printf("%6d bytes: %.2f us per hash (%zu)\n", n,
                std::chrono::duration<double, std::micro>(t1 - t0).count() / reps, acc & 1);
  }
}
