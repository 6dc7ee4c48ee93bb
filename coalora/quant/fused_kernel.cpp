// The quantizer's per-weight pass in one loop over each block: divide by the block's scale, find the
// nearest level, write the dequantized value and pack the code, with the weights read from memory once.
// coalora/quant/fused.py builds this file with the machine's C++ compiler, loads it with ctypes and
// falls back to the numpy path of coalora/quant/quantizer.py when it cannot; both give the same bits.
//
// Exactness: every step is the float32 operation the numpy path performs, in the same order, each
// rounded once. The build passes -ffp-contract=off (a fused multiply-add would round once where numpy
// rounds twice) and no -ffast-math; rintf rounds half to even, as numpy.rint and torch.round do.
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

// Largest magnitude of n floats, compared as integers: for non-negative floats the integer order of the
// bits is the float order, and a NaN (above +inf as an integer) wins, so the caller can see it.
inline uint32_t magnitude_max(const uint32_t* bits, int64_t n) {
    uint32_t best = 0;
    for (int64_t j = 0; j < n; ++j) {
        const uint32_t m = bits[j] & 0x7fffffffu;
        best = m > best ? m : best;
    }
    return best;
}

template <int BLOCK>
void absmax_blocks(const float* w, int64_t n, float* out) {
    const int64_t full = n / BLOCK;
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(w);
    for (int64_t b = 0; b < full; ++b) {
        const uint32_t m = magnitude_max(bits + b * BLOCK, BLOCK);
        std::memcpy(out + b, &m, 4);
    }
    if (n % BLOCK) {  // the zero padding of the last block never raises its maximum
        const uint32_t m = magnitude_max(bits + full * BLOCK, n % BLOCK);
        std::memcpy(out + full, &m, 4);
    }
}

// How a block's normalised weights become codes (COUNT, a template argument, picks the way):
// - COUNT > 0: count the midpoints below each value, one compare each (up to 7 of them);
// - COUNT == 0: the bin lookup of codebooks.NearestLookup: a bin on a uniform grid over [-1, 1], then
//   the bin's four entries (bins): the midpoints below it, the one midpoint inside it (+inf if none),
//   the level of a value below that midpoint and of one above it. One 16-byte load a weight brings all
//   four, where separate tables cost three gathers (lower, midpoint, level) per eight weights;
// - COUNT < 0 (codes of 4 bits, at most 64 bins): the same bins, the midpoints below each bin packed four
//   bits a bin into eight 32-bit words, and the one compare against the next midpoint up (thresholds, 16
//   entries padded with +inf): it is the bin's own midpoint if it has one, and above the bin if not.
struct Search {
    const float* thresholds;  // COUNT > 0: the midpoints; COUNT < 0: the midpoints and +inf, 16 in all
    float half_bins;          // bins: position = x * half_bins + half_bins, clipped to [0, last_bin]
    float last_bin;
    const int32_t* lower;     // COUNT < 0: midpoints below each bin as 4-bit fields (bin b: word b / 8,
                              // bits 4 * (b % 8)); else unused
    const float* bins;        // COUNT == 0: per bin {midpoints below (int32 bits), midpoint inside or
                              // +inf, level below it, level above it}; else unused
    const float* levels;      // the codebook, by code
};

inline int bin_of(float x, const Search& s) {
    float position = x * s.half_bins;
    position = position + s.half_bins;
    position = position < 0.0f ? 0.0f : position;
    position = position > s.last_bin ? s.last_bin : position;
    return static_cast<int>(position);  // truncation, as numpy's unsafe cast
}

template <int COUNT>
inline uint8_t code_of(float x, const Search& s) {
    if constexpr (COUNT > 0) {
        uint8_t code = 0;
        for (int t = 0; t < COUNT; ++t) code += x > s.thresholds[t];
        return code;
    } else if constexpr (COUNT < 0) {
        const int bin = bin_of(x, s);
        const int below = (s.lower[bin >> 3] >> (4 * (bin & 7))) & 15;
        return static_cast<uint8_t>(below + (x > s.thresholds[below]));
    } else {
        const float* entry = s.bins + 4 * bin_of(x, s);
        int32_t below;
        std::memcpy(&below, entry, 4);
        return static_cast<uint8_t>(below + (x > entry[1]));
    }
}

struct Job {
    const float* w;           // n weights
    int64_t n;
    const float* absmax;      // n_blocks
    int64_t n_blocks;
    int64_t block2;
    float low;                // min of absmax
    const float* steps;       // per group: scale2 (rounded to its dtype) / (2^scale_bits - 1)
    float top;                // 2^scale_bits - 1
    uint8_t* scale_codes;     // n_blocks
    float* scales;            // n_blocks
    uint8_t* packed;          // n_blocks * BLOCK * BITS / 8
    float* dense;             // n (the real weights only), or null
};

// Second-level quantization of blocks [first, stop), as double_quantize_scales does it: each block's scale
// code and dequantized scale (a loop the compiler vectorises: no division by the group size in it).
void block_scales(const Job& job, int64_t first, int64_t stop) {
    const float low = job.low, top = job.top;
    for (int64_t g = first / job.block2; g * job.block2 < stop; ++g) {
        const float step = job.steps[g];
        const float divisor = step > 1e-30f ? step : 1e-30f;
        const int64_t begin = g * job.block2 > first ? g * job.block2 : first;
        const int64_t end = (g + 1) * job.block2 < stop ? (g + 1) * job.block2 : stop;
        for (int64_t b = begin; b < end; ++b) {
            const float shifted = job.absmax[b] - low;
            float q = __builtin_rintf(shifted / divisor);
            q = q < 0.0f ? 0.0f : q;
            q = q > top ? top : q;
            q = step > 0.0f ? q : 0.0f;
            float scale = q * step;
            job.scales[b] = scale + low;
            job.scale_codes[b] = static_cast<uint8_t>(q);
        }
    }
}

// A second-level scale (finite, >= 0) stored in its dtype: the stored bits, and the value they hold.
// bfloat16 rounds to nearest even as torch's conversion does; float16 is IEEE binary16, rounded to nearest
// even, with subnormals and overflow to infinity, written out here so that no compiler support is needed.
enum Scale2 { FLOAT32 = 0, BFLOAT16 = 1, FLOAT16 = 2 };

inline uint16_t bfloat16_bits(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline uint16_t float16_bits(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if (u >= 0x477ff000u) return 0x7c00u;  // 65520 and up round to infinity
    if (u >= 0x38800000u) {  // a normal half (2^-14 and up): rebias the exponent, round away 13 bits
        return static_cast<uint16_t>((u - 0x38000000u + 0xfffu + ((u >> 13) & 1u)) >> 13);
    }
    const int exponent = static_cast<int>(u >> 23);  // a subnormal half: x / 2^-24, rounded
    const int shift = 126 - exponent;
    if (exponent == 0 || shift > 24) return 0;  // below a quarter of the least subnormal half
    const uint32_t mantissa = (u & 0x7fffffu) | 0x800000u, half = 1u << (shift - 1);
    uint32_t q = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u);
    q += rest > half || (rest == half && (q & 1u));
    return static_cast<uint16_t>(q);
}

inline float from_float16(uint16_t h) {
    if (h == 0x7c00u) return __builtin_inff();
    if (h < 0x0400u) return static_cast<float>(h) * 5.9604644775390625e-8f;  // h * 2^-24, exact
    const uint32_t u = (static_cast<uint32_t>(h) << 13) + 0x38000000u;
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

// Stores x as scale2[g] in the dtype; returns the float32 value stored.
inline float store_scale2(float x, int kind, void* scale2, int64_t g) {
    if (kind == BFLOAT16) {
        const uint16_t h = bfloat16_bits(x);
        std::memcpy(static_cast<uint16_t*>(scale2) + g, &h, 2);
        const uint32_t u = static_cast<uint32_t>(h) << 16;
        std::memcpy(&x, &u, 4);
    } else if (kind == FLOAT16) {
        const uint16_t h = float16_bits(x);
        std::memcpy(static_cast<uint16_t*>(scale2) + g, &h, 2);
        x = from_float16(h);
    } else {
        static_cast<float*>(scale2)[g] = x;
    }
    return x;
}

// Eight codes, one a byte, as BITS-bit fields at the bottom of the word: at each step the upper half of
// every lane moves down next to the lower half (codebooks._WordPlan's steps), and the masks drop the rest.
template <int BITS>
inline uint64_t squeeze(uint64_t word) {
    if constexpr (BITS == 2) {
        word = (word | (word >> 6)) & 0x000f000f000f000full;
        word = (word | (word >> 12)) & 0x000000ff000000ffull;
        word = (word | (word >> 24)) & 0xffffull;
    } else if constexpr (BITS == 3) {
        word = (word | (word >> 5)) & 0x003f003f003f003full;
        word = (word | (word >> 10)) & 0x00000fff00000fffull;
        word = (word | (word >> 20)) & 0xffffffull;
    } else if constexpr (BITS == 4) {
        word = (word | (word >> 4)) & 0x00ff00ff00ff00ffull;
        word = (word | (word >> 8)) & 0x0000ffff0000ffffull;
        word = (word | (word >> 16)) & 0xffffffffull;
    }
    return word;
}

template <int BITS, int BLOCK, int COUNT>
void quantize_scalar(const Job& job, const Search& s, int64_t first, int64_t stop) {
    float values[BLOCK];
    uint8_t codes[BLOCK];
    for (int64_t b = first; b < stop; ++b) {
        const float scale = job.scales[b];
        const float divisor = scale > 0.0f ? scale : 1.0f;
        const int64_t start = b * BLOCK;
        const float* x = job.w + start;
        if (start + BLOCK > job.n) {  // the last block: zero padding
            const int64_t real = job.n - start;
            for (int j = 0; j < BLOCK; ++j) values[j] = j < real ? x[j] : 0.0f;
            x = values;
        }
        for (int j = 0; j < BLOCK; ++j) codes[j] = code_of<COUNT>(x[j] / divisor, s);
        if (job.dense) {
            float* out = start + BLOCK > job.n ? values : job.dense + start;
            for (int j = 0; j < BLOCK; ++j) out[j] = s.levels[codes[j]] * scale;
            if (out == values) std::memcpy(job.dense + start, values, (job.n - start) * sizeof(float));
        }
        uint8_t* packed = job.packed + start / 8 * BITS;
        for (int j = 0; j < BLOCK; j += 8) {
            uint64_t word;
            std::memcpy(&word, codes + j, 8);
            word = squeeze<BITS>(word);
            std::memcpy(packed + j / 8 * BITS, &word, BITS);
        }
    }
}

#ifdef __AVX2__
#include "fused_kernel_avx2.h"
#endif

template <int BITS, int BLOCK, int COUNT>
void quantize_blocks(const Job& job, const Search& s, int64_t first, int64_t stop) {
    block_scales(job, first, stop);
#ifdef __AVX2__
    // whole rounds of 32 weights inside whole blocks (a round holds two blocks of 16)
    constexpr int64_t per_round = BLOCK < ROUND ? ROUND / BLOCK : 1;
    int64_t whole = job.n / BLOCK < stop ? job.n / BLOCK : stop;
    whole = whole <= first ? first : first + (whole - first) / per_round * per_round;
    if (first < whole && job.dense) quantize_avx2<BITS, BLOCK, COUNT, true>(job, s, first, whole);
    if (first < whole && !job.dense) quantize_avx2<BITS, BLOCK, COUNT, false>(job, s, first, whole);
    first = whole;
#endif
    quantize_scalar<BITS, BLOCK, COUNT>(job, s, first, stop);
}

using Kernel = void (*)(const Job&, const Search&, int64_t, int64_t);

template <int BITS, int COUNT>
Kernel by_block(int64_t block) {
    switch (block) {
        case 16: return quantize_blocks<BITS, 16, COUNT>;
        case 32: return quantize_blocks<BITS, 32, COUNT>;
        case 64: return quantize_blocks<BITS, 64, COUNT>;
        default: return nullptr;
    }
}

// count: see Search (the midpoints of 2-bit and 3-bit codebooks, -1 for 4-bit ones, 0 for 8-bit ones)
Kernel kernel(int64_t bits, int64_t block, int64_t count) {
    if (bits == 2 && count == 3) return by_block<2, 3>(block);
    if (bits == 2 && count == 2) return by_block<2, 2>(block);
    if (bits == 3 && count == 7) return by_block<3, 7>(block);
    if (bits == 3 && count == 6) return by_block<3, 6>(block);
    if (bits == 4 && count == -1) return by_block<4, -1>(block);
    if (bits == 8 && count == 0) return by_block<8, 0>(block);
    return nullptr;
}

#include "fused_dequantize.h"

}  // namespace

extern "C" {

int coalora_version() { return 4; }

// A packed tensor's values, as PackedTensor.dequantize's numpy path computes them: n_blocks * block
// floats into out from n_blocks * block * bits / 8 bytes of codes, the codebook's levels and one float32
// scale per block. Returns 0, or -1 for a bit width or block size it was not built for.
int coalora_dequantize(const uint8_t* packed, int64_t n_blocks, int64_t block, int64_t bits,
                       const float* levels, const float* scales, float* out) {
    if (block % 8 != 0) return -1;
    switch (bits) {
        case 2: dequantize_blocks<2>(packed, n_blocks, block, levels, scales, out); return 0;
        case 3: dequantize_blocks<3>(packed, n_blocks, block, levels, scales, out); return 0;
        case 4: dequantize_blocks<4>(packed, n_blocks, block, levels, scales, out); return 0;
        case 8: dequantize_blocks<8>(packed, n_blocks, block, levels, scales, out); return 0;
        default: return -1;
    }
}

// out[b] = max |w| over block b (n weights, the last block zero-padded). Returns 0, or -1 for a block size
// it was not built for.
int coalora_absmax(const float* w, int64_t n, int64_t block, float* out) {
    switch (block) {
        case 16: absmax_blocks<16>(w, n, out); return 0;
        case 32: absmax_blocks<32>(w, n, out); return 0;
        case 64: absmax_blocks<64>(w, n, out); return 0;
        default: return -1;
    }
}

// Converts n values (finite, >= 0) to the second-level dtype ``kind`` (see Scale2), for tests.
void coalora_scale2(const float* x, int64_t n, int64_t kind, void* out) {
    for (int64_t i = 0; i < n; ++i) store_scale2(x[i], static_cast<int>(kind), out, i);
}

// One matrix of n weights, as the quantizer's numpy path computes it: block absmax (given, or computed
// here when null), double quantization of the scales (scale2: n_groups values in its dtype; offset: the
// least absmax), packed scale codes (ceil(n_blocks / 8) * scale_bits bytes), packed codes (n_blocks *
// block * bits / 8 bytes) and, if dense is not null, the n dequantized values. The search tables are
// Search's. Returns 0; 1 if some absmax is not finite (nothing written: the caller takes the numpy path,
// which handles it its own way); -1 for a combination it was not built for.
int coalora_quantize(const float* w, int64_t n, int64_t block, const float* absmax, int64_t block2,
                     int64_t scale_bits, int64_t scale2_kind, int64_t bits, int64_t count,
                     const float* thresholds, float half_bins, float last_bin, const int32_t* lower,
                     const float* bins, const float* levels, void* scale2, float* offset,
                     uint8_t* scale_codes, uint8_t* packed, float* dense) {
    const Kernel run = kernel(bits, block, count);
    if (run == nullptr) return -1;
    const int64_t n_blocks = (n + block - 1) / block, n_groups = (n_blocks + block2 - 1) / block2;
    std::vector<float> own;
    if (absmax == nullptr) {
        own.resize(n_blocks);
        coalora_absmax(w, n, block, own.data());
        absmax = own.data();
    }
    float low = absmax[0];
    bool finite = true;
    for (int64_t b = 0; b < n_blocks; ++b) {
        low = absmax[b] < low ? absmax[b] : low;
        finite &= absmax[b] <= 3.4028234663852886e38f;  // false for +inf and NaN
    }
    if (!finite) return 1;
    const float top = static_cast<float>((1 << scale_bits) - 1);
    std::vector<float> steps(n_groups), scales(n_blocks);
    std::vector<uint8_t> codes((n_blocks + 7) / 8 * 8, 0);  // scale codes, zero-padded to whole words
    for (int64_t g = 0; g < n_groups; ++g) {  // each group's largest (absmax - low); zero padding adds 0
        float best = 0.0f;
        const int64_t stop = (g + 1) * block2 < n_blocks ? (g + 1) * block2 : n_blocks;
        for (int64_t b = g * block2; b < stop; ++b) {
            const float shifted = absmax[b] - low;
            best = shifted > best ? shifted : best;
        }
        steps[g] = store_scale2(best, static_cast<int>(scale2_kind), scale2, g) / top;
    }
    *offset = low;
    const Job job{w, n, absmax, n_blocks, block2, low, steps.data(), top, codes.data(), scales.data(),
                  packed, dense};
    const Search search{thresholds, half_bins, last_bin, lower, bins, levels};
    run(job, search, 0, n_blocks);
    for (size_t i = 0; i < codes.size(); i += 8) {  // the scale codes' bit stream
        uint64_t word = 0;
        for (int k = 0; k < 8; ++k) word |= static_cast<uint64_t>(codes[i + k]) << (scale_bits * k);
        std::memcpy(scale_codes + i / 8 * scale_bits, &word, scale_bits);
    }
    return 0;
}

}  // extern "C"
