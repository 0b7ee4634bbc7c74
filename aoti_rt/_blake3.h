/* aoti_rt: BLAKE3 for the loader (see _pieces.pyx). */
#ifndef AOTI_RT_BLAKE3_H
#define AOTI_RT_BLAKE3_H
/* BLAKE3 (unkeyed hash, 32-byte output), written from the BLAKE3 specification for the
   loader's small pieces and digest roots, so that they are hashed without the GIL.
   Portable C; four chunks at a time with GCC/Clang vector extensions. Checked against the
   blake3 package at first use (aoti_rt._pieces.b3_ok) and in the tests. */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

enum { B3_START = 1, B3_END = 2, B3_PARENT = 4, B3_ROOT = 8 };
static const uint32_t b3_iv[8] = {0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
                                  0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u};
static const uint8_t b3_sched[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

static inline uint32_t b3_load32(const uint8_t* p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline void b3_store32(uint8_t* p, uint32_t w) {
    p[0] = (uint8_t)w; p[1] = (uint8_t)(w >> 8); p[2] = (uint8_t)(w >> 16); p[3] = (uint8_t)(w >> 24);
}

#define B3_ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
#define B3_G(s, a, b, c, d, x, y) do { \
    s[a] = s[a] + s[b] + (x); s[d] = B3_ROTR(s[d] ^ s[a], 16); \
    s[c] = s[c] + s[d];       s[b] = B3_ROTR(s[b] ^ s[c], 12); \
    s[a] = s[a] + s[b] + (y); s[d] = B3_ROTR(s[d] ^ s[a], 8);  \
    s[c] = s[c] + s[d];       s[b] = B3_ROTR(s[b] ^ s[c], 7);  \
} while (0)
#define B3_ROUNDS(s, m) do { \
    for (int r_ = 0; r_ < 7; r_++) { \
        const uint8_t* k_ = b3_sched[r_]; \
        B3_G(s, 0, 4, 8, 12, m[k_[0]], m[k_[1]]);   B3_G(s, 1, 5, 9, 13, m[k_[2]], m[k_[3]]); \
        B3_G(s, 2, 6, 10, 14, m[k_[4]], m[k_[5]]);  B3_G(s, 3, 7, 11, 15, m[k_[6]], m[k_[7]]); \
        B3_G(s, 0, 5, 10, 15, m[k_[8]], m[k_[9]]);  B3_G(s, 1, 6, 11, 12, m[k_[10]], m[k_[11]]); \
        B3_G(s, 2, 7, 8, 13, m[k_[12]], m[k_[13]]); B3_G(s, 3, 4, 9, 14, m[k_[14]], m[k_[15]]); \
    } \
} while (0)

/* the first 8 words of the compression output: the next chaining value */
static void b3_compress(const uint32_t cv[8], const uint8_t block[64], uint32_t block_len,
                        uint64_t counter, uint32_t flags, uint32_t out[8]) {
    uint32_t m[16], s[16];
    for (int i = 0; i < 16; i++) m[i] = b3_load32(block + 4 * i);
    for (int i = 0; i < 8; i++) s[i] = cv[i];
    s[8] = b3_iv[0]; s[9] = b3_iv[1]; s[10] = b3_iv[2]; s[11] = b3_iv[3];
    s[12] = (uint32_t)counter; s[13] = (uint32_t)(counter >> 32); s[14] = block_len; s[15] = flags;
    B3_ROUNDS(s, m);
    for (int i = 0; i < 8; i++) out[i] = s[i] ^ s[i + 8];
}

/* a node not yet compressed: the last block of a chunk, or a parent */
typedef struct { uint32_t cv[8]; uint8_t block[64]; uint32_t block_len; uint64_t counter; uint32_t flags; } b3_node;

static void b3_chunk_node(const uint8_t* in, size_t len, uint64_t counter, b3_node* o) {
    size_t nblocks = len == 0 ? 1 : (len + 63) / 64, last = 64 * (nblocks - 1);
    uint32_t cv[8];
    memcpy(cv, b3_iv, sizeof cv);
    for (size_t b = 0; b + 1 < nblocks; b++)
        b3_compress(cv, in + 64 * b, 64, counter, b == 0 ? B3_START : 0, cv);
    memcpy(o->cv, cv, sizeof cv);
    memset(o->block, 0, 64);
    memcpy(o->block, in + last, len - last);
    o->block_len = (uint32_t)(len - last);
    o->counter = counter;
    o->flags = (nblocks == 1 ? B3_START : 0) | B3_END;
}

static void b3_parent_node(const uint32_t left[8], const uint32_t right[8], b3_node* o) {
    memcpy(o->cv, b3_iv, sizeof o->cv);
    for (int i = 0; i < 8; i++) { b3_store32(o->block + 4 * i, left[i]); b3_store32(o->block + 32 + 4 * i, right[i]); }
    o->block_len = 64; o->counter = 0; o->flags = B3_PARENT;
}

static inline void b3_node_cv(const b3_node* o, uint32_t cv[8]) {
    b3_compress(o->cv, o->block, o->block_len, o->counter, o->flags, cv);
}

#if defined(__GNUC__) || defined(__clang__)
#define B3_LANES 4
typedef uint32_t b3v __attribute__((vector_size(16)));
/* four whole consecutive chunks at once (one lane each): their chaining values */
static void b3_chunks4(const uint8_t* in, uint64_t counter, uint32_t cvs[4][8]) {
    b3v h[8], s[16], m[16];
    for (int i = 0; i < 8; i++) h[i] = (b3v){b3_iv[i], b3_iv[i], b3_iv[i], b3_iv[i]};
    b3v lo = {(uint32_t)counter, (uint32_t)(counter + 1), (uint32_t)(counter + 2), (uint32_t)(counter + 3)};
    b3v hi = {(uint32_t)(counter >> 32), (uint32_t)((counter + 1) >> 32), (uint32_t)((counter + 2) >> 32),
              (uint32_t)((counter + 3) >> 32)};
    for (int b = 0; b < 16; b++) {
        const uint8_t* p = in + 64 * b;
        for (int j = 0; j < 16; j++)
            m[j] = (b3v){b3_load32(p + 4 * j), b3_load32(p + 1024 + 4 * j), b3_load32(p + 2048 + 4 * j),
                         b3_load32(p + 3072 + 4 * j)};
        uint32_t f = (b == 0 ? B3_START : 0) | (b == 15 ? B3_END : 0);
        for (int i = 0; i < 8; i++) s[i] = h[i];
        for (int i = 0; i < 4; i++) s[8 + i] = (b3v){b3_iv[i], b3_iv[i], b3_iv[i], b3_iv[i]};
        s[12] = lo; s[13] = hi; s[14] = (b3v){64, 64, 64, 64}; s[15] = (b3v){f, f, f, f};
        B3_ROUNDS(s, m);
        for (int i = 0; i < 8; i++) h[i] = s[i] ^ s[i + 8];
    }
    for (int l = 0; l < 4; l++)
        for (int i = 0; i < 8; i++) cvs[l][i] = h[i][l];
}
#else
#define B3_LANES 1
#endif

/* BLAKE3 of in[0:len] into out[32]. */
static void aoti_rt_b3_hash(const uint8_t* in, size_t len, uint8_t out[32]) {
    uint32_t stack[64][8], cv[8], cvs[4][8];
    int sp = 0, last_done = 0;
    uint64_t nchunks = len == 0 ? 1 : (len + 1023) / 1024, c = 0;
    int whole_last = nchunks > 1 && len % 1024 == 0;   /* the last chunk is no root: lanes may take it */
    b3_node o;
    while (c + 1 < nchunks) {       /* every chunk but the last is whole */
        int n = 1;
#if B3_LANES == 4
        if (c + 4 < nchunks || (whole_last && c + 4 == nchunks)) { b3_chunks4(in + 1024 * c, c, cvs); n = 4; }
        else
#endif
        { b3_chunk_node(in + 1024 * c, 1024, c, &o); b3_node_cv(&o, cvs[0]); }
        for (int l = 0; l < n; l++) {
            uint64_t total = ++c;
            memcpy(cv, cvs[l], sizeof cv);
            if (c == nchunks) { last_done = 1; break; }    /* the last chunk's chaining value */
            while ((total & 1) == 0) {
                b3_parent_node(stack[--sp], cv, &o);
                b3_node_cv(&o, cv);
                total >>= 1;
            }
            memcpy(stack[sp++], cv, sizeof cv);
        }
    }
    if (last_done)                  /* nchunks > 1, so the stack is not empty */
        b3_parent_node(stack[--sp], cv, &o);
    else
        b3_chunk_node(in + 1024 * c, len - 1024 * c, c, &o);
    while (sp > 0) {
        b3_node_cv(&o, cv);
        b3_parent_node(stack[--sp], cv, &o);
    }
    b3_compress(o.cv, o.block, o.block_len, 0, o.flags | B3_ROOT, cv);
    for (int i = 0; i < 8; i++) b3_store32(out + 4 * i, cv[i]);
}

/* aoti_rt.digest.combine's root: BLAKE3(domain + le64(nbytes) + hashes[0:32 * nhashes]).
   0, or -1 if out of memory. */
static int aoti_rt_b3_combine(const uint8_t* domain, size_t dlen, uint64_t nbytes,
                              const uint8_t* hashes, size_t nhashes, uint8_t out[32]) {
    uint8_t small[1024];
    size_t n = dlen + 8 + 32 * nhashes;
    uint8_t* buf = n <= sizeof small ? small : (uint8_t*)malloc(n);
    if (buf == NULL) return -1;
    memcpy(buf, domain, dlen);
    for (int i = 0; i < 8; i++) buf[dlen + i] = (uint8_t)(nbytes >> (8 * i));
    if (nhashes) memcpy(buf + dlen + 8, hashes, 32 * nhashes);
    aoti_rt_b3_hash(buf, n, out);
    if (buf != small) free(buf);
    return 0;
}

#endif  /* AOTI_RT_BLAKE3_H */
