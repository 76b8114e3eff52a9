/* The compiled data path (Linux): one wake-up's datagrams of a socket, without a Python object each.
 *
 * relay.py reads its sockets with ``recvmsg`` and hands every datagram to the endpoint, which
 * parses, authenticates, frames and seals it, each step a few Python objects.  This module does
 * the same for the common case, an ESTABLISHED tcp connection's data, in batches of ``recvmmsg``
 * (UDP GRO's coalesced datagrams cut apart again), with the record tags computed here (BLAKE2b,
 * RFC 7693):
 * * the **reader** (``Reader.drain``) takes a tunnel socket's steered segments: it parses them,
 *   checks their records against the replay window and their tags, and sends the DATA frames of
 *   flows whose socket the relay names (``sink``) on to it, in runs with UDP GSO;
 * * the **writer** (``Writer.fill``) takes the application's (client) or the target's (server)
 *   datagrams: it packs them into DATA frames and records, and seals those; on the packet send
 *   path it makes the connection's segments of them and sends them itself (``wire_send``).
 *
 * Records of one size have their tags computed four at a time (``record_tags``: AVX2, one
 * message per 64-bit lane), the writer's before it hands them over, the reader's when it reaches
 * the first of them (the others are looked up when it reaches them).
 *
 * The protocol stays in Python (rsockd.core), and nothing is cached between wake-ups.  Once per
 * connection (or flow) and wake-up the endpoint is asked whether this path may take it and for
 * its state (``fast_conn``, ``fast_flow``: None sends everything to the full path), and told what
 * was done (``steered_run``: counters, the new sequence number, timestamp and replay window, the
 * DATA frames it did not send, and per flow what it sent; ``flow_sent`` and ``sealed_run``: the
 * sealed records, which the endpoint makes segments of, or ``sent_run``: what the writer sent
 * itself where the relay's ``wire`` gave it the packet path and the connection's header
 * fields).  Where a flow's datagrams go is asked
 * once per connection, flow and call (``sink``, the relay's: the endpoint's ``fast_sink`` names
 * the flow, the relay its socket).  Anything else (a handshake, FIN, RST, a control frame, a
 * record that does not parse, no connection, a new flow's first datagram, an oversized one) is
 * returned as it came, after everything before it was given back, and the caller passes it to
 * ``receive_steered`` / ``send_app`` / ``send_target``: order is kept, and what that path counts
 * or answers is its own.  tests/unit/test_datapath.py runs both paths over the same segments and
 * datagrams and compares the endpoints afterwards.
 *
 * The raw send path's runs of segments (``send_raw``: headers, IDs and TCP checksums made here,
 * one ``sendmmsg``) are rawsock.py's loop in C; tests/integration/test_raw_send.py compares the
 * packets both send, and tests/integration/test_packet_send_kernel.py the writer's own frames
 * with packetsend.py's.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <stdarg.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#define UDP_GRO 104
#define UDP_SEGMENT 103       /* <linux/udp.h>: UDP GSO's segment size (cmsg on SOL_UDP) */

#define NMSG 32               /* datagrams per recvmmsg */
#define BUFSZ (65536 + 64)    /* one read: up to 64 coalesced segments (GRO) */
#define CTLSZ 64              /* pktinfo (v4: 12 bytes, v6: 20) and GRO's segment size */
#define MAXRUNS 16            /* connections given back together */
#define WINDOW_WORDS 16       /* the replay window: up to 1024 counters */
#define MAXSINKS 8            /* flows of one connection sent to here per wake-up; more take the endpoint's path */
#define OUTQ 512              /* datagrams queued for the application side before they are sent */
#define GSO_SEGS 64           /* UDP_MAX_SEGMENTS */
#define GSO_BYTES 65000       /* core/batching.py GSO_MAX_BYTES */

/* -- calls into Python ----------------------------------------------------------------------- */

/* The endpoint's methods the data path calls, by interned name (PyInit__datapath). */
static PyObject *M_fast_conn, *M_steered_run, *M_flow_sent, *M_sealed_run, *M_sent_run, *M_fast_flow;
/* ... and the relay's, and its attributes, that the wait loop (Serve) uses. */
static PyObject *M_tunnel_back, *M_tunnel_failed, *M_fill_back, *M_fill_failed, *M_handle, *M_pump, *A_closing,
    *A_timer_at, *A_sink_of;

#define CALL_ARGS_MAX 16

/* ``callable(*args)``, or with ``name`` ``callable.name(*args)``, ``args`` made by Py_BuildValue
 * from ``fmt`` (in parentheses: always a tuple).  A vectorcall: no bound method, no name made,
 * the arguments passed as they are (the compiled endpoint's methods take them so). */
static PyObject *call(PyObject *callable, PyObject *name, const char *fmt, ...)
{
    va_list va;
    va_start(va, fmt);
    PyObject *args = Py_VaBuildValue(fmt, va);
    va_end(va);
    if (args == NULL)
        return NULL;
    if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) > CALL_ARGS_MAX) {
        Py_DECREF(args);
        PyErr_SetString(PyExc_SystemError, "_datapath call: a format in parentheses, of at most 16 arguments");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    PyObject *stack[CALL_ARGS_MAX + 1];
    stack[0] = callable;
    for (Py_ssize_t i = 0; i < n; i++)
        stack[i + 1] = PyTuple_GET_ITEM(args, i);
    PyObject *res = name != NULL ? PyObject_VectorcallMethod(name, stack, (size_t)n + 1, NULL)
                                 : PyObject_Vectorcall(callable, stack + 1, (size_t)n, NULL);
    Py_DECREF(args);
    return res;
}

/* -- BLAKE2b (RFC 7693), keyed, with a personalization: the record tag ------------------------ */

typedef struct {
    uint64_t h[8], t[2];
    uint8_t b[128];
    size_t c, outlen;
} b2b;

static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static inline uint64_t load64le(const uint8_t *p)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
#else
    return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24 |
           (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 | (uint64_t)p[6] << 48 | (uint64_t)p[7] << 56;
#endif
}

#define ROTR64(x, n) (((x) >> (n)) | ((x) << (64 - (n))))
#define G(a, b, c, d, x, y)                                  \
    do {                                                     \
        v[a] = v[a] + v[b] + (x); v[d] = ROTR64(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d];       v[b] = ROTR64(v[b] ^ v[c], 24); \
        v[a] = v[a] + v[b] + (y); v[d] = ROTR64(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d];       v[b] = ROTR64(v[b] ^ v[c], 63); \
    } while (0)

static void b2b_compress(b2b *s, int last)
{
    uint64_t v[16], m[16];
    for (int i = 0; i < 8; i++) {
        v[i] = s->h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= s->t[0];
    v[13] ^= s->t[1];
    if (last)
        v[14] = ~v[14];
    for (int i = 0; i < 16; i++)
        m[i] = load64le(s->b + 8 * i);
    /* the rounds unrolled: each message word's index is then a constant */
#define ROUND(r)                                                 \
    do {                                                         \
        G(0, 4, 8, 12, m[SIGMA[r][0]], m[SIGMA[r][1]]);          \
        G(1, 5, 9, 13, m[SIGMA[r][2]], m[SIGMA[r][3]]);          \
        G(2, 6, 10, 14, m[SIGMA[r][4]], m[SIGMA[r][5]]);         \
        G(3, 7, 11, 15, m[SIGMA[r][6]], m[SIGMA[r][7]]);         \
        G(0, 5, 10, 15, m[SIGMA[r][8]], m[SIGMA[r][9]]);         \
        G(1, 6, 11, 12, m[SIGMA[r][10]], m[SIGMA[r][11]]);       \
        G(2, 7, 8, 13, m[SIGMA[r][12]], m[SIGMA[r][13]]);        \
        G(3, 4, 9, 14, m[SIGMA[r][14]], m[SIGMA[r][15]]);        \
    } while (0)
    ROUND(0); ROUND(1); ROUND(2); ROUND(3); ROUND(4); ROUND(5);
    ROUND(6); ROUND(7); ROUND(8); ROUND(9); ROUND(10); ROUND(11);
#undef ROUND
    for (int i = 0; i < 8; i++)
        s->h[i] ^= v[i] ^ v[i + 8];
}

static void b2b_init(b2b *s, size_t outlen, const uint8_t *key, size_t keylen, const uint8_t *person,
                     size_t personlen)
{
    uint8_t p[64] = {0};
    p[0] = (uint8_t)outlen;
    p[1] = (uint8_t)keylen;
    p[2] = 1; /* fanout */
    p[3] = 1; /* depth */
    memcpy(p + 48, person, personlen);
    for (int i = 0; i < 8; i++)
        s->h[i] = IV[i] ^ load64le(p + 8 * i);
    s->t[0] = s->t[1] = 0;
    s->c = 0;
    s->outlen = outlen;
    if (keylen) { /* the key is the first block, compressed once more input comes */
        memset(s->b, 0, 128);
        memcpy(s->b, key, keylen);
        s->c = 128;
    }
}

static void b2b_update(b2b *s, const uint8_t *in, size_t n)
{
    while (n > 0) {
        if (s->c == 128) {
            s->t[0] += 128;
            if (s->t[0] < 128)
                s->t[1]++;
            b2b_compress(s, 0);
            s->c = 0;
        }
        size_t k = 128 - s->c;
        if (k > n)
            k = n;
        memcpy(s->b + s->c, in, k);
        s->c += k;
        in += k;
        n -= k;
    }
}

static void b2b_final(b2b *s, uint8_t *out)
{
    s->t[0] += s->c;
    if (s->t[0] < s->c)
        s->t[1]++;
    memset(s->b + s->c, 0, 128 - s->c);
    b2b_compress(s, 1);
    for (size_t i = 0; i < s->outlen; i++)
        out[i] = (uint8_t)(s->h[i >> 3] >> (8 * (i & 7)));
}

/* -- records' tags four at a time ------------------------------------------------------------ */

/* The tag of a record: BLAKE2b-64 of ``start`` (keyed, personalized, the connection's context
 * absorbed: Run.mac, Out.mac), then the record's counter (8 bytes), then its frames. */
static void record_tag(const b2b *start, const uint8_t *counter, const uint8_t *frames, size_t n, uint8_t out[8])
{
    b2b h = *start;
    b2b_update(&h, counter, 8);
    b2b_update(&h, frames, n);
    b2b_final(&h, out);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MULTI 1
/* BLAKE2b's compression is a chain of dependent additions, XORs and rotations: one message keeps
 * a vector unit no busier than the scalar code does.  Four messages of equal length, one in each
 * 64-bit lane (word i of message k in lane k of v[i]), go through the same chain together: with
 * AVX2, ~2.5x the tags per second of one after the other.  A run's records are mostly of one
 * size (a flow's datagrams are), so the reader and the writer hand them over in fours. */
#define AVX2 __attribute__((target("avx2")))
AVX2 static inline __m256i ror32(__m256i x) { return _mm256_shuffle_epi32(x, _MM_SHUFFLE(2, 3, 0, 1)); }
AVX2 static inline __m256i ror24(__m256i x)
{
    return _mm256_shuffle_epi8(x, _mm256_setr_epi8(3, 4, 5, 6, 7, 0, 1, 2, 11, 12, 13, 14, 15, 8, 9, 10,
                                                   3, 4, 5, 6, 7, 0, 1, 2, 11, 12, 13, 14, 15, 8, 9, 10));
}
AVX2 static inline __m256i ror16(__m256i x)
{
    return _mm256_shuffle_epi8(x, _mm256_setr_epi8(2, 3, 4, 5, 6, 7, 0, 1, 10, 11, 12, 13, 14, 15, 8, 9,
                                                   2, 3, 4, 5, 6, 7, 0, 1, 10, 11, 12, 13, 14, 15, 8, 9));
}
AVX2 static inline __m256i ror63(__m256i x) { return _mm256_or_si256(_mm256_srli_epi64(x, 63), _mm256_add_epi64(x, x)); }

/* One compression of four states ``h`` by four blocks ``blk`` (128 bytes each), at byte count ``t``. */
AVX2 static void b2b4_compress(__m256i h[8], const uint8_t *const blk[4], uint64_t t, int last)
{
    __m256i m[16], v[16];
    for (int q = 0; q < 4; q++) { /* words 4q..4q+3 of the four blocks, transposed into lanes */
        __m256i r0 = _mm256_loadu_si256((const __m256i *)(blk[0] + 32 * q));
        __m256i r1 = _mm256_loadu_si256((const __m256i *)(blk[1] + 32 * q));
        __m256i r2 = _mm256_loadu_si256((const __m256i *)(blk[2] + 32 * q));
        __m256i r3 = _mm256_loadu_si256((const __m256i *)(blk[3] + 32 * q));
        __m256i lo01 = _mm256_unpacklo_epi64(r0, r1), hi01 = _mm256_unpackhi_epi64(r0, r1);
        __m256i lo23 = _mm256_unpacklo_epi64(r2, r3), hi23 = _mm256_unpackhi_epi64(r2, r3);
        m[4 * q + 0] = _mm256_permute2x128_si256(lo01, lo23, 0x20);
        m[4 * q + 1] = _mm256_permute2x128_si256(hi01, hi23, 0x20);
        m[4 * q + 2] = _mm256_permute2x128_si256(lo01, lo23, 0x31);
        m[4 * q + 3] = _mm256_permute2x128_si256(hi01, hi23, 0x31);
    }
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = _mm256_set1_epi64x((long long)IV[i]);
    }
    v[12] = _mm256_xor_si256(v[12], _mm256_set1_epi64x((long long)t));
    if (last)
        v[14] = _mm256_xor_si256(v[14], _mm256_set1_epi64x(-1));
#define G4(a, b, c, d, x, y)                                            \
    do {                                                                \
        v[a] = _mm256_add_epi64(_mm256_add_epi64(v[a], v[b]), (x));     \
        v[d] = ror32(_mm256_xor_si256(v[d], v[a]));                     \
        v[c] = _mm256_add_epi64(v[c], v[d]);                            \
        v[b] = ror24(_mm256_xor_si256(v[b], v[c]));                     \
        v[a] = _mm256_add_epi64(_mm256_add_epi64(v[a], v[b]), (y));     \
        v[d] = ror16(_mm256_xor_si256(v[d], v[a]));                     \
        v[c] = _mm256_add_epi64(v[c], v[d]);                            \
        v[b] = ror63(_mm256_xor_si256(v[b], v[c]));                     \
    } while (0)
#define ROUND4(r)                                               \
    do {                                                        \
        G4(0, 4, 8, 12, m[SIGMA[r][0]], m[SIGMA[r][1]]);        \
        G4(1, 5, 9, 13, m[SIGMA[r][2]], m[SIGMA[r][3]]);        \
        G4(2, 6, 10, 14, m[SIGMA[r][4]], m[SIGMA[r][5]]);       \
        G4(3, 7, 11, 15, m[SIGMA[r][6]], m[SIGMA[r][7]]);       \
        G4(0, 5, 10, 15, m[SIGMA[r][8]], m[SIGMA[r][9]]);       \
        G4(1, 6, 11, 12, m[SIGMA[r][10]], m[SIGMA[r][11]]);     \
        G4(2, 7, 8, 13, m[SIGMA[r][12]], m[SIGMA[r][13]]);      \
        G4(3, 4, 9, 14, m[SIGMA[r][14]], m[SIGMA[r][15]]);      \
    } while (0)
    ROUND4(0); ROUND4(1); ROUND4(2); ROUND4(3); ROUND4(4); ROUND4(5);
    ROUND4(6); ROUND4(7); ROUND4(8); ROUND4(9); ROUND4(10); ROUND4(11);
#undef ROUND4
#undef G4
    for (int i = 0; i < 8; i++)
        h[i] = _mm256_xor_si256(h[i], _mm256_xor_si256(v[i], v[i + 8]));
}

/* record_tag of four records of ``n`` bytes of frames each: message k is start's buffered bytes,
 * counter[k] (8 bytes), frames[k].  A block that lies within the frames is read where it is;
 * the others (the first, with the buffered bytes and the counter, and the zero-padded last)
 * are put together in ``tmp``. */
AVX2 static void record_tags4(const b2b *start, const uint8_t *const counter[4], const uint8_t *const frames[4],
                              size_t n, uint8_t out[4][8])
{
    __m256i h[8];
    uint8_t tmp[4][128];
    for (int i = 0; i < 8; i++)
        h[i] = _mm256_set1_epi64x((long long)start->h[i]);
    size_t c = start->c, total = c + 8 + n;
    for (size_t at = 0; at < total; at += 128) {
        size_t end = at + 128 < total ? at + 128 : total;
        const uint8_t *blk[4];
        for (int k = 0; k < 4; k++) {
            if (at >= c + 8 && end == at + 128) {
                blk[k] = frames[k] + (at - c - 8);
                continue;
            }
            const struct { const uint8_t *src; size_t from, to; } parts[3] = {
                {start->b, 0, c}, {counter[k], c, c + 8}, {frames[k], c + 8, total}};
            uint8_t *b = tmp[k];
            memset(b, 0, 128);
            for (int q = 0; q < 3; q++) {
                size_t lo = parts[q].from > at ? parts[q].from : at, hi = parts[q].to < end ? parts[q].to : end;
                if (lo < hi)
                    memcpy(b + (lo - at), parts[q].src + (lo - parts[q].from), hi - lo);
            }
            blk[k] = b;
        }
        b2b4_compress(h, blk, start->t[0] + end, end == total);
    }
    uint64_t w[4];
    _mm256_storeu_si256((__m256i *)w, h[0]);
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < 8; i++)
            out[k][i] = (uint8_t)(w[k] >> (8 * i));
}

static int have_avx2;
#else
#define MULTI 0
#endif

/* record_tag of ``count`` (1-4) records of ``n`` bytes of frames each: four at once where the
 * CPU can (with fewer, the spare lanes repeat the first record), else one after the other. */
static void record_tags(const b2b *start, int count, const uint8_t *const counter[4], const uint8_t *const frames[4],
                        size_t n, uint8_t out[4][8])
{
#if MULTI
    if (have_avx2 && count > 1 && start->t[1] == 0 && start->t[0] < ((uint64_t)1 << 62) && start->outlen == 8 &&
        start->c <= 128) {
        const uint8_t *cs[4], *fs[4];
        for (int k = 0; k < 4; k++) {
            cs[k] = counter[k < count ? k : 0];
            fs[k] = frames[k < count ? k : 0];
        }
        record_tags4(start, cs, fs, n, out);
        return;
    }
#endif
    for (int k = 0; k < count; k++)
        record_tag(start, counter[k], frames[k], n, out[k]);
}

/* -- the reader ------------------------------------------------------------------------------ */

static inline uint32_t be16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }
static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }

/* After an error: ``give_back`` (flush_all, writer_flush: what the wake-up did, to the endpoint)
 * with the error kept aside, so that the endpoint is not called with an exception set, and
 * raised again after (an error of the giving back is dropped for the first). */
#define GIVE_BACK_KEEPING_ERROR(give_back)              \
    do {                                                \
        PyObject *type_, *value_, *tb_;                 \
        PyErr_Fetch(&type_, &value_, &tb_);             \
        if ((give_back) < 0)                            \
            PyErr_Clear();                              \
        PyErr_Restore(type_, value_, tb_);              \
    } while (0)

static inline void put16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void put32(uint8_t *p, uint32_t v)
{
    put16(p, v >> 16);
    put16(p + 2, v);
}

/* -- one wake-up's reads of a socket: recvmmsg into buffers kept between calls -------------------- */

typedef struct {
    uint8_t *bufs;                    /* NMSG buffers of BUFSZ (pages are touched only as reads need them) */
    struct mmsghdr msgs[NMSG];
    struct iovec iov[NMSG];
    struct sockaddr_storage names[NMSG];
    uint8_t ctl[NMSG][CTLSZ];
    int n, idx;                       /* datagrams read and not yet taken; the next one */
    long datagrams, got;              /* this wake-up's reads, against its budget */
    int drained;                      /* the last read returned less than it asked for */
} Batch;

/* Read the next datagrams of ``fd`` into ``b``: > 0 read (idx back at 0), 0 the wake-up is over
 * (EAGAIN, the socket emptied by a short read, or the budget spent: ``batch_end``), -1 an error
 * (errno; it counts against the batch, so a lasting one cannot spin).  ``names``/``ctl``: ask for
 * the senders' addresses and the control messages. */
static int batch_read(Batch *b, int fd, int batch, long budget, int names, int ctl)
{
    /* a read that got less than it asked for emptied the socket: the next datagram wakes the
     * loop again, and another read would only say EAGAIN */
    if (b->drained || b->datagrams >= batch || b->got >= budget)
        return 0;
    int want = batch - (int)b->datagrams < NMSG ? batch - (int)b->datagrams : NMSG;
    for (int i = 0; i < want; i++) {
        struct msghdr *mh = &b->msgs[i].msg_hdr;
        b->iov[i].iov_base = b->bufs + (size_t)i * BUFSZ;
        b->iov[i].iov_len = BUFSZ;
        mh->msg_iov = &b->iov[i];
        mh->msg_iovlen = 1;
        mh->msg_name = names ? &b->names[i] : NULL;
        mh->msg_namelen = names ? sizeof b->names[i] : 0;
        mh->msg_control = ctl ? b->ctl[i] : NULL;
        mh->msg_controllen = ctl ? CTLSZ : 0;
        mh->msg_flags = 0;
    }
    int got = recvmmsg(fd, b->msgs, (unsigned)want, MSG_DONTWAIT, NULL); /* never blocks */
    if (got <= 0) {
        if (got == 0 || errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return 0;
        b->datagrams++;
        return -1;
    }
    b->n = got;
    b->idx = 0;
    b->drained = got < want;
    b->datagrams += got;
    for (int i = 0; i < got; i++)
        b->got += (long)b->msgs[i].msg_len;
    return got;
}

static void batch_end(Batch *b)
{
    b->datagrams = b->got = 0;
    b->drained = 0;
}

/* Both types start with their Batch: one constructor. */
typedef struct {
    PyObject_HEAD
    Batch in;
} IoObject;

static PyObject *io_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    if (PyTuple_GET_SIZE(args) || (kw != NULL && PyDict_GET_SIZE(kw))) {
        PyErr_Format(PyExc_TypeError, "%s() takes no arguments", type->tp_name);
        return NULL;
    }
    IoObject *self = (IoObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->in.bufs = PyMem_RawMalloc((size_t)NMSG * BUFSZ);
    if (self->in.bufs == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

enum { FIN = 0x01, SYN = 0x02, RST = 0x04, PSH = 0x08, ACK = 0x10 };
enum { DATA = 3, KEEPALIVE = 4 }; /* core/framing.py FrameType */

/* Sends that failed, by errno, until the caller takes them (``take_errors``). */
typedef struct {
    struct {
        int err;
        long count;
    } e[8];
    int n;
} Errors;

/* Where one flow's datagrams go (the relay's ``sink`` answer): a socket, and the address to
 * send to when it is not connected.  No flow: its DATA frames take the endpoint's path. */
typedef struct {
    PyObject *flow;                   /* strong: the endpoint's handle for steered_run; NULL: the endpoint's path */
    uint32_t id;
    int fd;
    struct sockaddr_storage sa;
    socklen_t salen;                  /* 0: the socket is connected */
    long count, nbytes;               /* datagrams sent to it in this run */
} Sink;

/* One connection's segments within a wake-up, and its receive state while they are read. */
typedef struct {
    PyObject *conn;                   /* strong reference */
    PyObject *data;                   /* list of (flow_id, bytes) for the endpoint's path, or NULL */
    Sink sinks[MAXSINKS];
    int nsinks;
    uint8_t key[36];                  /* local address, local port, remote address, remote port */
    b2b mac;                          /* keyed, personalized, the connection's context absorbed */
    uint32_t rcv_nxt, ts_recent;
    int ts_ok, ts_set;
    uint64_t top;                     /* the replay window (framing.ReplayWindow) */
    int has_top;
    uint32_t size;
    uint64_t bits[WINDOW_WORDS];
    long segments, nbytes, authed, authed_bytes, replays, bad;
} Run;

typedef struct {
    PyObject_HEAD
    Batch in;                         /* first: IoObject */
    size_t off;                       /* where the next segment of datagram idx starts (GRO) */
    uint8_t dst[16];                  /* datagram idx's destination (pktinfo) */
    int has_dst;
    size_t seg;                       /* datagram idx's GRO segment size, 0: one segment */
    Run runs[MAXRUNS];
    int nruns;
    struct {                          /* DATA frames for the application side, sent by out_flush */
        Sink *sink;                   /* NULL once sent */
        const uint8_t *p;             /* in the batch's buffers: sent before the next read */
        size_t n;
    } outq[OUTQ];
    int nout;
    PyObject *sink_of;                /* during a drain: the caller's ``sink``, or None */
    int gso, gso_refused;
    Errors errors;                    /* sends that failed, until ``take_errors`` */
    const uint8_t *ahead, *ahead_end; /* the segments after this one in datagram idx (GRO), or NULL */
    struct {
        const Run *run;
        const uint8_t *rec;
        uint8_t tag[8];
    } pre[3];                         /* tags of records ahead, computed with an earlier one (reader_tag) */
    int npre;
    long long tags_ahead;             /* records whose tag was ready when they came (a count for tests) */
    long long rx_batches, rx_batched; /* reads that carried several segments (GRO), and those segments */
} Reader;

static void window_mark(Run *r, uint64_t counter)
{
    if (!r->has_top || counter > r->top) {
        uint64_t shift = r->has_top ? counter - r->top : (uint64_t)r->size + 1;
        if (shift >= r->size) {
            memset(r->bits, 0, sizeof r->bits);
            r->bits[0] = 1;
        } else {
            unsigned words = (unsigned)(shift / 64), b = (unsigned)(shift % 64);
            for (int i = WINDOW_WORDS - 1; i >= 0; i--) {
                uint64_t hi = i - (int)words >= 0 ? r->bits[i - words] : 0;
                uint64_t lo = i - (int)words - 1 >= 0 ? r->bits[i - words - 1] : 0;
                r->bits[i] = b ? (hi << b) | (lo >> (64 - b)) : hi;
            }
            r->bits[0] |= 1;
            unsigned keep = r->size; /* bits at or above size fall out of the window */
            for (unsigned i = 0; i < WINDOW_WORDS; i++) {
                if (keep >= 64 * (i + 1))
                    continue;
                r->bits[i] &= keep <= 64 * i ? 0 : (((uint64_t)1 << (keep - 64 * i)) - 1);
            }
        }
        r->top = counter;
        r->has_top = 1;
    } else {
        uint64_t age = r->top - counter;
        r->bits[age / 64] |= (uint64_t)1 << (age % 64);
    }
}

static int window_fresh(const Run *r, uint64_t counter)
{
    if (!r->has_top || counter > r->top)
        return 1;
    uint64_t age = r->top - counter;
    return age < r->size && !((r->bits[age / 64] >> (age % 64)) & 1);
}

static void run_clear(Run *r)
{
    Py_CLEAR(r->conn);
    Py_CLEAR(r->data);
    for (int i = 0; i < r->nsinks; i++)
        Py_CLEAR(r->sinks[i].flow);
    r->nsinks = 0;
}

/* -- the application side: the DATA frames of taken records, sent from here ------------------------ */

static void count_error(Errors *es, int err, long n)
{
    for (int i = 0; i < es->n; i++)
        if (es->e[i].err == err) {
            es->e[i].count += n;
            return;
        }
    if (es->n == 8) { /* more kinds than that within one call: counted as the last one */
        es->e[7].count += n;
        return;
    }
    es->e[es->n].err = err;
    es->e[es->n].count = n;
    es->n++;
}

/* ``[(errno, count)]`` of ``es``, which starts again empty. */
static PyObject *errors_take(Errors *es)
{
    PyObject *list = PyList_New(0);
    for (int i = 0; list != NULL && i < es->n; i++) {
        PyObject *item = Py_BuildValue("(il)", es->e[i].err, es->e[i].count);
        if (item == NULL || PyList_Append(list, item) < 0)
            Py_CLEAR(list);
        Py_XDECREF(item);
    }
    es->n = 0;
    return list;
}

/* One sendmsg: one datagram, or a run of equal-sized ones with UDP GSO (delivery.py: the kernel
 * makes the datagrams; where GSO is refused, every datagram goes on its own from then on). */
static void send_run(Reader *self, Sink *s, struct iovec *iov, int k, size_t size)
{
    struct msghdr mh;
    char ctl[CMSG_SPACE(sizeof(uint16_t))];
    memset(&mh, 0, sizeof mh);
    mh.msg_name = s->salen ? &s->sa : NULL;
    mh.msg_namelen = s->salen;
    mh.msg_iov = iov;
    mh.msg_iovlen = (size_t)k;
    if (k > 1) {
        memset(ctl, 0, sizeof ctl);
        mh.msg_control = ctl;
        mh.msg_controllen = sizeof ctl;
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_UDP;
        c->cmsg_type = UDP_SEGMENT;
        c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t seg = (uint16_t)size;
        memcpy(CMSG_DATA(c), &seg, sizeof seg);
    }
    if (sendmsg(s->fd, &mh, MSG_DONTWAIT) >= 0)
        return;
    int err = errno;
    if (k > 1 && (err == EINVAL || err == EIO || err == EOPNOTSUPP || err == ENOPROTOOPT)) {
        self->gso = 0;
        self->gso_refused = 1;
        for (int i = 0; i < k; i++)
            send_run(self, s, &iov[i], 1, iov[i].iov_len);
        return;
    }
    count_error(&self->errors, err, k);
}

/* Send what is queued: per destination in order, runs of equal sizes together (core/batching.py
 * ``runs``: a zero-length datagram alone, a shorter one may end a run). */
static void out_flush(Reader *self)
{
    int n = self->nout;
    self->nout = 0;
    struct iovec iov[GSO_SEGS];
    for (int i = 0; i < n; i++) {
        Sink *s = self->outq[i].sink;
        if (s == NULL)
            continue;
        int k = 0;
        size_t size = 0, total = 0;
        for (int j = i; j < n; j++) {
            if (self->outq[j].sink != s)
                continue;
            size_t m = self->outq[j].n;
            self->outq[j].sink = NULL;
            /* joins the run: GSO on, the same size (or a shorter last), room left */
            if (k > 0 && !(self->gso && size > 0 && m > 0 && m <= size && k < GSO_SEGS && total + m <= GSO_BYTES)) {
                send_run(self, s, iov, k, size);
                k = 0;
            }
            if (k == 0) {
                size = m;
                total = 0;
            }
            iov[k].iov_base = (void *)self->outq[j].p;
            iov[k].iov_len = m;
            k++;
            total += m;
            if (m < size) { /* a shorter one ends its run */
                send_run(self, s, iov, k, size);
                k = 0;
            }
        }
        if (k)
            send_run(self, s, iov, k, size);
    }
}

/* ``addr``: None (a connected socket), or (host, port) / (host, port, flowinfo, scope_id). */
static int sink_address(PyObject *addr, Sink *s)
{
    s->salen = 0;
    if (addr == Py_None)
        return 0;
    const char *host;
    int port;
    unsigned int flowinfo = 0, scope = 0;
    if (!PyArg_ParseTuple(addr, "si|II", &host, &port, &flowinfo, &scope))
        return -1;
    memset(&s->sa, 0, sizeof s->sa);
    struct sockaddr_in *s4 = (struct sockaddr_in *)&s->sa;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&s->sa;
    if (inet_pton(AF_INET, host, &s4->sin_addr) == 1) {
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        s->salen = sizeof *s4;
    } else if (inet_pton(AF_INET6, host, &s6->sin6_addr) == 1) {
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
        s6->sin6_flowinfo = htonl(flowinfo);
        s6->sin6_scope_id = scope;
        s->salen = sizeof *s6;
    } else {
        PyErr_Format(PyExc_ValueError, "sink: %R is not an address", addr);
        return -1;
    }
    return 0;
}

/* Where flow ``id`` of run ``r`` goes: asked of the caller's ``sink`` once per run; NULL with an
 * exception on error.  A flow it declines (or one past MAXSINKS) takes the endpoint's path for
 * the whole run, so a flow's datagrams keep their order. */
static Sink NO_SINK;

static Sink *sink_for(Reader *self, Run *r, uint32_t id)
{
    for (int i = 0; i < r->nsinks; i++)
        if (r->sinks[i].id == id)
            return &r->sinks[i];
    if (self->sink_of == NULL || self->sink_of == Py_None || r->nsinks == MAXSINKS)
        return &NO_SINK;
    Sink *s = &r->sinks[r->nsinks];
    memset(s, 0, sizeof *s);
    s->id = id;
    PyObject *got = call(self->sink_of, NULL, "(Ok)", r->conn, (unsigned long)id);
    if (got == NULL)
        return NULL;
    if (got != Py_None) {
        PyObject *flow, *addr;
        int fd;
        if (!PyArg_ParseTuple(got, "OiO", &flow, &fd, &addr) || sink_address(addr, s) < 0) {
            Py_DECREF(got);
            return NULL;
        }
        s->fd = fd;
        s->flow = Py_NewRef(flow);
    }
    Py_DECREF(got);
    r->nsinks++;
    return s;
}

/* Give one run back to the endpoint (steered_run). */
static int run_flush(Run *r, PyObject *endpoint, PyObject *now)
{
    uint8_t raw[WINDOW_WORDS * 8];
    for (int i = 0; i < WINDOW_WORDS; i++)
        for (int k = 0; k < 8; k++)
            raw[8 * i + k] = (uint8_t)(r->bits[i] >> (8 * k));
    PyObject *ts = r->ts_set ? PyLong_FromUnsignedLong(r->ts_recent) : Py_NewRef(Py_None);
    PyObject *top = r->has_top ? PyLong_FromUnsignedLongLong(r->top) : PyLong_FromLong(-1);
    PyObject *sent = NULL; /* [(flow, count, bytes)] of the flows sent to from here */
    for (int i = 0; i < r->nsinks; i++) {
        Sink *s = &r->sinks[i];
        if (s->flow == NULL || s->count == 0)
            continue;
        PyObject *item = (sent != NULL || (sent = PyList_New(0)) != NULL)
                             ? Py_BuildValue("(Oll)", s->flow, s->count, s->nbytes) : NULL;
        if (item == NULL || PyList_Append(sent, item) < 0) {
            Py_XDECREF(item);
            Py_CLEAR(sent);
            Py_CLEAR(ts); /* fails the call below */
            break;
        }
        Py_DECREF(item);
    }
    PyObject *res = ts == NULL || top == NULL ? NULL : call(
        endpoint, M_steered_run, "(OOllllkOOy#llOO)", r->conn, r->data ? r->data : Py_None, r->segments,
        r->nbytes, r->authed, r->authed_bytes, (unsigned long)r->rcv_nxt, ts, top, (const char *)raw,
        (Py_ssize_t)sizeof raw, r->replays, r->bad, sent ? sent : Py_None, now);
    Py_XDECREF(ts);
    Py_XDECREF(top);
    Py_XDECREF(sent);
    run_clear(r);
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    return 0;
}

static int flush_all(Reader *self, PyObject *endpoint, PyObject *now)
{
    out_flush(self); /* before the runs their sinks are in go */
    self->npre = 0;  /* the runs (and then the buffers) the tags ahead belong to end */
    int rc = 0;
    for (int i = 0; i < self->nruns; i++) {
        if (rc == 0)
            rc = run_flush(&self->runs[i], endpoint, now);
        else
            run_clear(&self->runs[i]);
    }
    self->nruns = 0;
    return rc;
}

/* The run of this segment's connection: found, or started from the endpoint's fast_conn.
 * NULL with no exception: the connection takes the full path (or is not one). */
static Run *run_for(Reader *self, const uint8_t *key, size_t llen, size_t ralen, PyObject *endpoint,
                    PyObject *now)
{
    for (int i = 0; i < self->nruns; i++)
        if (memcmp(self->runs[i].key, key, sizeof self->runs[i].key) == 0)
            return &self->runs[i];
    if (self->nruns == MAXRUNS && flush_all(self, endpoint, now) < 0)
        return NULL;
    PyObject *st = call(endpoint, M_fast_conn, "(y#Iy#I)", (const char *)key, (Py_ssize_t)llen,
                                       be16(key + 16), (const char *)key + 18, (Py_ssize_t)ralen, be16(key + 34));
    if (st == NULL || st == Py_None) {
        Py_XDECREF(st);
        return NULL;
    }
    /* (conn, rcv_nxt, ts_ok, ts_recent, (key, person, context), top, bits, size) */
    PyObject *conn, *mac, *top, *bits;
    unsigned long rcv_nxt, ts_recent, size;
    int ts_ok;
    const char *k, *person, *context;
    Py_ssize_t klen, plen, clen, blen;
    Run *r = &self->runs[self->nruns];
    if (!PyArg_ParseTuple(st, "OkpkOOSk", &conn, &rcv_nxt, &ts_ok, &ts_recent, &mac, &top, &bits, &size) ||
        !PyArg_ParseTuple(mac, "y#y#y#", &k, &klen, &person, &plen, &context, &clen)) {
        Py_DECREF(st);
        return NULL;
    }
    /* the window's top: -1 before the first record, else any 64-bit counter */
    int overflow;
    long long stop = PyLong_AsLongLongAndOverflow(top, &overflow);
    int has_top = overflow > 0 || (overflow == 0 && stop >= 0);
    unsigned long long utop = overflow > 0 ? PyLong_AsUnsignedLongLong(top) : (unsigned long long)stop;
    if (PyErr_Occurred()) {
        Py_DECREF(st);
        return NULL;
    }
    blen = PyBytes_GET_SIZE(bits);
    if (klen > 64 || plen > 16 || size == 0 || size > 64 * WINDOW_WORDS || blen > (Py_ssize_t)sizeof r->bits) {
        Py_DECREF(st);
        PyErr_SetString(PyExc_ValueError, "fast_conn: a key, personalization or window the reader cannot hold");
        return NULL;
    }
    memset(r, 0, sizeof *r);
    memcpy(r->key, key, sizeof r->key);
    Py_INCREF(conn);
    r->conn = conn;
    r->rcv_nxt = (uint32_t)rcv_nxt;
    r->ts_ok = ts_ok;
    r->ts_recent = (uint32_t)ts_recent;
    r->has_top = has_top;
    r->top = utop;
    r->size = (uint32_t)size;
    const uint8_t *b = (const uint8_t *)PyBytes_AS_STRING(bits);
    for (Py_ssize_t i = 0; i < blen; i++)
        r->bits[i / 8] |= (uint64_t)b[i] << (8 * (i % 8));
    b2b_init(&r->mac, 8, (const uint8_t *)k, (size_t)klen, (const uint8_t *)person, (size_t)plen);
    b2b_update(&r->mac, (const uint8_t *)context, (size_t)clen);
    Py_DECREF(st);
    self->nruns++;
    return r;
}

/* Can the records of this payload be taken here?  Every record and frame must parse, and the
 * frames be DATA (with a flow id) or KEEPALIVE; else the full path (which counts and handles). */
static int records_simple(const uint8_t *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (i + 18 > n)
            return 0;
        size_t length = be16(p + i);
        if (length < 16 || i + 2 + length > n)
            return 0;
        size_t f = i + 18, stop = i + 2 + length;
        while (f < stop) {
            if (f + 3 > stop)
                return 0;
            uint8_t type = p[f];
            size_t flen = be16(p + f + 1);
            f += 3;
            if (f + flen > stop || !(type == KEEPALIVE || (type == DATA && flen >= 4)))
                return 0;
            f += flen;
        }
        i = stop;
    }
    return 1;
}

#if MULTI
/* Records of ``n`` bytes of frames after the one being checked, into ``recs`` (which holds
 * ``count``) up to four: the rest of its segment's payload [more, more_end), then the payloads of
 * the datagram's next segments (drain's layout; their headers are checked when they are taken).
 * A look at eight records at most. */
static int same_size_ahead(const Reader *self, size_t n, const uint8_t *more, const uint8_t *more_end,
                           const uint8_t *recs[4], int count)
{
    const uint8_t *seg = self->ahead, *end = self->ahead_end;
    int looked = 0;
    for (;;) {
        while (count < 4 && looked < 8 && more_end - more >= 18) {
            size_t length = be16(more);
            if (length < 16 || (size_t)(more_end - more) < 2 + length)
                break;
            looked++;
            if (length - 16 == n)
                recs[count++] = more;
            more += 2 + length;
        }
        if (count == 4 || looked >= 8 || seg == NULL || seg >= end)
            return count;
        size_t len = (size_t)(end - seg);
        if (self->seg && len > self->seg)
            len = self->seg;
        const uint8_t *p = seg;
        size_t hlen = (size_t)(p[0] >> 4) * 4;
        seg += len;
        more = more_end = p;
        if (len >= 12 && hlen >= 20 && 12 + (hlen - 20) <= len) {
            more = p + 12 + (hlen - 20);
            more_end = p + len;
        }
    }
}
#endif

/* The tag that record ``rec`` (``n`` bytes of frames) must carry: computed earlier with the record
 * before it, or now with up to three records of the same size ahead of it (record_tags), whose
 * tags wait in ``pre`` until take() reaches them.  The look ahead only saves work: a record's tag
 * is computed from its own bytes and its run's key either way. */
static void reader_tag(Reader *self, const Run *r, const uint8_t *rec, size_t n, const uint8_t *more,
                       const uint8_t *more_end, uint8_t out[8])
{
    for (int k = 0; k < self->npre; k++)
        if (self->pre[k].rec == rec && self->pre[k].run == r) {
            memcpy(out, self->pre[k].tag, 8);
            self->tags_ahead++;
            return;
        }
    const uint8_t *recs[4] = {rec}, *cs[4], *fs[4];
    int count = 1;
#if MULTI
    if (have_avx2)
        count = same_size_ahead(self, n, more, more_end, recs, 1);
#else
    (void)more;
    (void)more_end;
#endif
    uint8_t tags[4][8];
    for (int k = 0; k < count; k++) {
        cs[k] = recs[k] + 2;
        fs[k] = recs[k] + 18;
    }
    record_tags(&r->mac, count, cs, fs, n, tags);
    memcpy(out, tags[0], 8);
    self->npre = count - 1;
    for (int k = 1; k < count; k++) {
        self->pre[k - 1].run = r;
        self->pre[k - 1].rec = recs[k];
        memcpy(self->pre[k - 1].tag, tags[k], 8);
    }
}

/* One segment of an eligible connection: 0 taken, -1 an error (exception set). */
static int take(Reader *self, Run *r, uint32_t seq, int has_ts, uint32_t tsval, const uint8_t *p, size_t n)
{
    r->segments++;
    r->nbytes += (long)n;
    if (n == 0)
        return 0;
    int authed = 0;
    size_t i = 0;
    while (i < n) {
        size_t stop = i + 2 + be16(p + i);
        uint64_t counter = be64(p + i + 2);
        const uint8_t *tag = p + i + 10, *frames = p + i + 18;
        size_t flen = stop - (i + 18);
        if (!window_fresh(r, counter)) {
            r->replays++;
            i = stop;
            continue;
        }
        uint8_t out[8];
        reader_tag(self, r, p + i, flen, p + stop, p + n, out);
        uint8_t diff = 0;
        for (int k = 0; k < 8; k++)
            diff |= out[k] ^ tag[k];
        if (diff) {
            r->bad++;
            i = stop;
            continue;
        }
        window_mark(r, counter);
        authed = 1;
        size_t f = 0;
        while (f < flen) {
            uint8_t type = frames[f];
            size_t len = be16(frames + f + 1);
            const uint8_t *body = frames + f + 3;
            Sink *s = type == DATA ? sink_for(self, r, be32(body)) : NULL;
            if (type == DATA && s == NULL)
                return -1;
            if (s != NULL && s->flow != NULL) {
                if (self->nout == OUTQ)
                    out_flush(self);
                self->outq[self->nout].sink = s;
                self->outq[self->nout].p = body + 4;
                self->outq[self->nout].n = len - 4;
                self->nout++;
                s->count++;
                s->nbytes += (long)(len - 4);
            } else if (type == DATA) {
                if (r->data == NULL && (r->data = PyList_New(0)) == NULL)
                    return -1;
                PyObject *item = Py_BuildValue("(ky#)", (unsigned long)be32(body), (const char *)body + 4,
                                               (Py_ssize_t)(len - 4));
                if (item == NULL || PyList_Append(r->data, item) < 0) {
                    Py_XDECREF(item);
                    return -1;
                }
                Py_DECREF(item);
            }
            f += 3 + len;
        }
        i = stop;
    }
    if (authed) {
        r->authed++;
        r->authed_bytes += (long)n;
        uint32_t end = seq + (uint32_t)n;
        if ((int32_t)(end - r->rcv_nxt) > 0) /* faketcp.seq_after */
            r->rcv_nxt = end;
        if (has_ts && r->ts_ok) {
            r->ts_recent = tsval;
            r->ts_set = 1;
        }
    }
    return 0;
}

/* The next datagram's destination and GRO segment size, from its control messages. */
static void parse_cmsgs(Reader *self, struct msghdr *mh)
{
    self->has_dst = 0;
    self->seg = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c != NULL; c = CMSG_NXTHDR(mh, c)) {
        size_t dlen = c->cmsg_len - CMSG_LEN(0);
        const uint8_t *d = CMSG_DATA(c);
        if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO && dlen >= 12) {
            memcpy(self->dst, d + 8, 4); /* struct in_pktinfo: ifindex, spec_dst, addr */
            self->has_dst = 4;
        } else if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO && dlen >= 16) {
            memcpy(self->dst, d, 16);
            self->has_dst = 16;
        } else if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO && dlen >= 4) {
            int v;
            memcpy(&v, d, sizeof v);
            self->seg = v > 0 ? (size_t)v : 0;
        }
    }
}

/* Datagram idx begins: its control messages, and whether GRO put several segments in it. */
static void start_datagram(Reader *self)
{
    parse_cmsgs(self, &self->in.msgs[self->in.idx].msg_hdr);
    size_t len = self->in.msgs[self->in.idx].msg_len;
    if (self->seg && len > self->seg) {
        self->rx_batches++;
        self->rx_batched += (long long)((len + self->seg - 1) / self->seg);
    }
}

static PyObject *slow(const uint8_t *local, size_t llen, int lport, const uint8_t *remote, size_t rlen, int rport,
                      const uint8_t *p, size_t n)
{
    if (local == NULL)
        return Py_BuildValue("(O(y#i)y#)", Py_None, (const char *)remote, (Py_ssize_t)rlen, rport,
                             (const char *)p, (Py_ssize_t)n);
    return Py_BuildValue("((y#i)(y#i)y#)", (const char *)local, (Py_ssize_t)llen, lport, (const char *)remote,
                         (Py_ssize_t)rlen, rport, (const char *)p, (Py_ssize_t)n);
}

PyDoc_STRVAR(drain_doc,
"drain(fd, family, port, endpoint, now, pktinfo, fallback, batch, budget, sink, gso)\n--\n\n"
"Read the tunnel socket ``fd`` (``family``, tunnel port ``port``) until EAGAIN or ``batch``\n"
"datagrams / ``budget`` bytes, taking every established connection's data segment here.\n"
"Returns None when done, or ``(local, remote, segment)`` for the caller to pass to\n"
"``endpoint.receive_steered`` before calling again (``local`` None: no destination known).\n"
"``pktinfo``: the local address comes from IP_PKTINFO (server), else it is b\"\" (client);\n"
"``fallback``: the server's local_ip (packed) for a datagram without one, or None.\n"
"``sink(conn, flow_id)``: where that flow's datagrams go, asked once per connection, flow and\n"
"call: None (its DATA frames go to the endpoint with the rest), or ``(flow, fd, addr)``: they are\n"
"sent to socket ``fd`` (``addr`` None when it is connected, else a socket address tuple) from\n"
"here, and ``steered_run`` is told ``(flow, count, bytes)``; ``sink`` None: every DATA frame goes\n"
"to the endpoint.  ``gso``: send runs of equal-sized datagrams with UDP GSO.  What failed to\n"
"send, ``take_errors`` says.");

static PyObject *drain_reads(Reader *self, int fd, int family, int port, PyObject *endpoint, PyObject *now,
                             int pktinfo, const uint8_t *fb, Py_ssize_t fblen, int batch, long budget);

/* ``Reader.drain``, for Python and for the wait loop: ``sink`` (borrowed) and ``gso`` for this call. */
static PyObject *drain(Reader *self, PyObject *sink, int gso, int fd, int family, int port, PyObject *endpoint,
                       PyObject *now, int pktinfo, const uint8_t *fb, Py_ssize_t fblen, int batch, long budget)
{
    self->sink_of = sink;
    self->gso = self->gso_refused ? 0 : gso;
    PyObject *res = drain_reads(self, fd, family, port, endpoint, now, pktinfo, fb, fblen, batch, budget);
    self->sink_of = NULL;
    return res;
}

/* ``fallback``: a packed address (4 or 16 bytes), its bytes in ``*fb``/``*fblen``, or None (NULL, 0). */
static int packed_fallback(PyObject *fallback, const char *what, const uint8_t **fb, Py_ssize_t *fblen)
{
    *fb = NULL;
    *fblen = 0;
    if (fallback == Py_None)
        return 0;
    if (!PyBytes_Check(fallback) || (PyBytes_GET_SIZE(fallback) != 4 && PyBytes_GET_SIZE(fallback) != 16)) {
        PyErr_Format(PyExc_TypeError, "%s: fallback is a packed address or None", what);
        return -1;
    }
    *fb = (const uint8_t *)PyBytes_AS_STRING(fallback);
    *fblen = PyBytes_GET_SIZE(fallback);
    return 0;
}

static PyObject *Reader_drain(Reader *self, PyObject *args)
{
    int fd, family, port, pktinfo, batch, gso;
    long budget;
    PyObject *endpoint, *now, *fallback, *sink_of;
    if (!PyArg_ParseTuple(args, "iiiOOpOilOp:drain", &fd, &family, &port, &endpoint, &now, &pktinfo, &fallback,
                          &batch, &budget, &sink_of, &gso))
        return NULL;
    if (sink_of != Py_None && !PyCallable_Check(sink_of)) {
        PyErr_SetString(PyExc_TypeError, "drain: sink is a callable or None");
        return NULL;
    }
    const uint8_t *fb;
    Py_ssize_t fblen;
    if (packed_fallback(fallback, "drain", &fb, &fblen) < 0)
        return NULL;
    return drain(self, sink_of, gso, fd, family, port, endpoint, now, pktinfo, fb, fblen, batch, budget);
}

static PyObject *drain_reads(Reader *self, int fd, int family, int port, PyObject *endpoint, PyObject *now,
                             int pktinfo, const uint8_t *fb, Py_ssize_t fblen, int batch, long budget)
{
    size_t alen = family == AF_INET6 ? 16 : 4;
    for (;;) {
        if (self->in.idx >= self->in.n) {
            out_flush(self); /* the next read reuses the buffers the queue points into */
            self->npre = 0;  /* ... and the tags ahead computed from them */
            int got = batch_read(&self->in, fd, batch, budget, 1, 1);
            if (got == 0)
                break;
            if (got < 0) {
                int err = errno;
                if (flush_all(self, endpoint, now) < 0)
                    return NULL;
                errno = err;
                return PyErr_SetFromErrno(PyExc_OSError);
            }
            self->off = 0;
            start_datagram(self);
        }
        /* the next segment: datagram idx, from off (GRO: cut at its segment size) */
        Batch *in = &self->in;
        const uint8_t *buf = in->bufs + (size_t)in->idx * BUFSZ;
        size_t len = in->msgs[in->idx].msg_len, start = self->off;
        size_t end = self->seg && len > self->seg ? (start + self->seg < len ? start + self->seg : len) : len;
        const struct sockaddr *sa = (const struct sockaddr *)&in->names[in->idx];
        uint8_t key[36] = {0};
        const uint8_t *raddr;
        int rport;
        if (sa->sa_family == AF_INET6) {
            const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
            raddr = s6->sin6_addr.s6_addr;
            rport = ntohs(s6->sin6_port);
        } else {
            const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
            raddr = (const uint8_t *)&s4->sin_addr;
            rport = ntohs(s4->sin_port);
        }
        const uint8_t *laddr = NULL;
        size_t llen = 0;
        uint8_t dst[16]; /* a copy: moving on to the next datagram below overwrites self->dst */
        if (!pktinfo) {
            laddr = (const uint8_t *)"";
        } else if (self->has_dst == (int)alen) {
            memcpy(dst, self->dst, alen);
            laddr = dst;
            llen = alen;
        } else if (fb != NULL) {
            laddr = fb;
            llen = (size_t)fblen;
        }
        /* move on first: a segment returned to the caller is not read again */
        self->off = end;
        if (self->off >= len) {
            in->idx++;
            self->off = 0;
            if (in->idx < in->n)
                start_datagram(self);
        }
        const uint8_t *p = buf + start;
        size_t n = end - start;
        self->ahead = end < len ? buf + end : NULL;
        self->ahead_end = buf + len;
        /* a segment of an established connection's data, in the layout the XDP program makes
         * (docs/protocol.md): offflags window seq ack options payload, options none or our
         * timestamps (NOP NOP TS) */
        if (laddr == NULL || n < 12 || p[0] < 0x50)
            goto full;
        uint32_t offflags = be16(p), hlen = (offflags >> 12) * 4, flags = offflags & 0x1FF;
        if (hlen < 20 || 12 + (size_t)(hlen - 20) > n || (flags & ~(uint32_t)PSH) != ACK)
            goto full;
        int has_ts = 0;
        uint32_t tsval = 0;
        if (hlen == 32 && p[12] == 1 && p[13] == 1 && p[14] == 8 && p[15] == 10) {
            has_ts = 1;
            tsval = be32(p + 16);
        } else if (hlen != 20) {
            goto full;
        }
        const uint8_t *payload = p + 12 + (hlen - 20);
        size_t plen = n - 12 - (hlen - 20);
        if (plen && !records_simple(payload, plen))
            goto full;
        if (llen)
            memcpy(key, laddr, llen);
        put16(key + 16, (uint32_t)port);
        memcpy(key + 18, raddr, alen);
        put16(key + 34, (uint32_t)rport);
        Run *r = run_for(self, key, llen, alen, endpoint, now);
        if (r == NULL) {
            if (PyErr_Occurred()) {
                GIVE_BACK_KEEPING_ERROR(flush_all(self, endpoint, now));
                return NULL;
            }
            goto full;
        }
        if (take(self, r, be32(p + 4), has_ts, tsval, payload, plen) < 0) {
            GIVE_BACK_KEEPING_ERROR(flush_all(self, endpoint, now));
            return NULL;
        }
        continue;
    full:
        if (flush_all(self, endpoint, now) < 0)
            return NULL;
        return slow(laddr, llen, port, raddr, alen, rport, p, n);
    }
    batch_end(&self->in);
    if (flush_all(self, endpoint, now) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* -- the writer: application datagrams into sealed records ----------------------------------- */

#define MAXFLOWS 16
#define RECORD_HEAD 18 /* length counter tag */
#define DATA_HEAD 7    /* type length flow_id */
#define RUN_MAX 32     /* core/endpoint.py BATCH_MAX: records in one GSO send */
#define SEG_GROWTH 72  /* core/endpoint.py BATCH_OVERHEAD - RECORD_OVERHEAD: TCP and IP headers, the tag */
#define TCP_TS_HL 32   /* a TCP header with NOP NOP TS: every segment of a connection with timestamps */

/* A connection's segments as the packet send path makes them (dataplane/packetsend.py): one
 * Ethernet frame per run of records, behind a virtio-net header that has the kernel finish the
 * TCP checksum and, for a run of several, cut it into segments (GSO).  The relay's ``wire``
 * gives the link's socket and the frame's fixed parts, the connection its header fields
 * (faketcp.Connection.wire_state); what was sent goes back with ``sent_run``. */
typedef struct {
    int fd;             /* the link's packet socket; -1: no wire */
    int v4;
    uint8_t eth[14];
    uint8_t src[16], dst[16];
    unsigned ttl;
    uint32_t label;     /* IPv6: the connection's flow label */
    int ident;          /* IPv4: the next ID (IpIdent), -1: every packet's is 0 */
    uint16_t lport, rport, window;
    uint32_t seq, ack, tsval, tsecr;
    uint32_t psum;      /* core/packet.py pseudo_sum: without the length */
    uint32_t hsum;      /* IPv4: the header's own sum without total length, ID and checksum */
    long segments, nbytes;
} Wire;

/* One connection's records within a wake-up. */
typedef struct {
    PyObject *conn;     /* strong */
    PyObject *records;  /* sealed records (bytes) */
    b2b mac;
    uint64_t counter;   /* the next record's */
    size_t budget;      /* a record's frames at most: the largest datagram's DATA frame */
    uint8_t *frames;    /* the record being filled */
    size_t fill;
    uint8_t *untagged[4]; /* sealed records (in ``records``) of one size whose tags out_tag writes */
    int nuntagged;
    Wire wire;          /* how the writer sends the records itself; fd -1: sealed_run */
} Out;

/* One flow's datagrams within a wake-up. */
typedef struct {
    PyObject *flow;     /* strong: the endpoint's handle (fast_flow) */
    uint8_t key[sizeof(struct sockaddr_in6)];
    socklen_t keylen;
    int out;
    uint32_t flow_id;
    size_t limit;
    long count, nbytes;
} Flow;

typedef struct {
    PyObject_HEAD
    Batch in;           /* first: IoObject */
    Out outs[MAXRUNS];
    int nouts;
    Flow flows[MAXFLOWS];
    int nflows;
    PyObject *wire_of;  /* during a fill: the caller's ``wire``, or None */
    Errors errors;      /* the writer's own sends that failed, until ``take_errors`` */
    long long tx_batches, tx_batched; /* its GSO sends, and the segments they made */
} Writer;

/* The tags of the records out_seal left untagged: before ``records`` goes to the endpoint. */
static void out_tag(Out *o)
{
    if (o->nuntagged == 0)
        return;
    const uint8_t *cs[4], *fs[4];
    uint8_t tags[4][8];
    for (int k = 0; k < o->nuntagged; k++) {
        cs[k] = o->untagged[k] + 2;
        fs[k] = o->untagged[k] + RECORD_HEAD;
    }
    record_tags(&o->mac, o->nuntagged, cs, fs, be16(o->untagged[0]) - 16, tags);
    for (int k = 0; k < o->nuntagged; k++)
        memcpy(o->untagged[k] + 10, tags[k], 8);
    o->nuntagged = 0;
}

static int out_seal(Out *o)
{
    if (o->fill == 0)
        return 0;
    PyObject *rec = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(RECORD_HEAD + o->fill));
    if (rec == NULL)
        return -1;
    uint8_t *r = (uint8_t *)PyBytes_AS_STRING(rec);
    size_t length = 16 + o->fill;
    put16(r, (uint32_t)length);
    for (int k = 0; k < 8; k++)
        r[2 + k] = (uint8_t)(o->counter >> (56 - 8 * k));
    memcpy(r + RECORD_HEAD, o->frames, o->fill);
    o->counter++;
    o->fill = 0;
    int rc = PyList_Append(o->records, rec);
    Py_DECREF(rec); /* ``records`` keeps it until out_clear */
    if (rc < 0)
        return -1;
    /* its tag later, with up to three more records of its size (record_tags) */
    if (o->nuntagged && be16(o->untagged[0]) != length)
        out_tag(o);
    o->untagged[o->nuntagged++] = r;
    if (o->nuntagged == 4)
        out_tag(o);
    return 0;
}

static void out_clear(Out *o)
{
    o->nuntagged = 0;
    Py_CLEAR(o->conn);
    Py_CLEAR(o->records);
    PyMem_Free(o->frames);
    o->frames = NULL;
}

static inline uint32_t fold16(uint32_t s) /* packetsend.py _fold */
{
    s = (s & 0xFFFF) + (s >> 16);
    return (s & 0xFFFF) + (s >> 16);
}

/* The connection's wire (``wire(conn, now)``: (fd, eth, ttl, src, dst, lport, rport, seq, ack,
 * window, tsval, tsecr, ident, label)); 0 with ``w->fd`` -1 when the caller gave none. */
static int wire_from(Wire *w, PyObject *t)
{
    w->fd = -1;
    if (t == Py_None)
        return 0;
    int fd, ttl, lport, rport, window, ident;
    unsigned long seq, ack, tsval, tsecr, label;
    const char *eth, *src, *dst;
    Py_ssize_t elen, slen, dlen;
    if (!PyArg_ParseTuple(t, "iy#iy#y#iikkikkik", &fd, &eth, &elen, &ttl, &src, &slen, &dst, &dlen, &lport, &rport,
                          &seq, &ack, &window, &tsval, &tsecr, &ident, &label))
        return -1;
    if (elen != 14 || slen != dlen || (slen != 4 && slen != 16) || ttl < 1 || ttl > 255 || ident < -1 ||
        ident > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "wire: a link header, addresses, TTL or ID the writer cannot send with");
        return -1;
    }
    w->v4 = slen == 4;
    memcpy(w->eth, eth, 14);
    memcpy(w->src, src, (size_t)slen);
    memcpy(w->dst, dst, (size_t)slen);
    w->ttl = (unsigned)ttl;
    w->label = (uint32_t)label & 0xFFFFF;
    w->ident = ident;
    w->lport = (uint16_t)lport;
    w->rport = (uint16_t)rport;
    w->window = (uint16_t)window;
    w->seq = (uint32_t)seq;
    w->ack = (uint32_t)ack;
    w->tsval = (uint32_t)tsval;
    w->tsecr = (uint32_t)tsecr;
    uint64_t words = 0;
    for (Py_ssize_t i = 0; i < slen; i += 2)
        words += be16((const uint8_t *)src + i) + be16((const uint8_t *)dst + i);
    w->psum = (uint32_t)(words % 0xFFFF) + 6; /* int.from_bytes(src + dst) % 0xFFFF + PROTO_TCP */
    w->hsum = 0x4500 + 0x4000 + (w->ttl << 8 | 6) + (uint32_t)words;
    w->segments = w->nbytes = 0;
    w->fd = fd;
    return 0;
}

/* Send ``o``'s sealed records as segments (core/endpoint.py ``_emit_sealed`` and
 * packetsend.py's ``send``): runs of equal-sized records (batching.runs), one frame each, all in
 * one sendmmsg.  Sends that fail are counted by errno; the sequence space is used all the same. */
static int wire_send(Writer *self, Out *o)
{
    Wire *w = &o->wire;
    Py_ssize_t n = PyList_GET_SIZE(o->records);
    if (n == 0)
        return 0;
    size_t iphl = w->v4 ? 20 : 40, head = 10 + 14 + iphl + TCP_TS_HL, csum_start = 14 + iphl;
    uint8_t *heads = PyMem_Malloc(head * (size_t)n);
    struct mmsghdr *msgs = PyMem_Calloc((size_t)n, sizeof *msgs);
    struct iovec *iov = PyMem_Malloc(sizeof *iov * (size_t)(n + n * 2));
    if (heads == NULL || msgs == NULL || iov == NULL) {
        PyMem_Free(heads);
        PyMem_Free(msgs);
        PyMem_Free(iov);
        PyErr_NoMemory();
        return -1;
    }
    int nmsg = 0;
    size_t k = 0; /* iovecs used */
    for (Py_ssize_t i = 0; i < n;) {
        size_t size = (size_t)PyBytes_GET_SIZE(PyList_GET_ITEM(o->records, i));
        size_t fit = 65000 / (size + SEG_GROWTH); /* batching.runs, GSO_MAX_BYTES */
        fit = fit < 1 ? 1 : fit > RUN_MAX ? RUN_MAX : fit;
        Py_ssize_t j = i + 1;
        while (j < n && (size_t)(j - i) < fit && (size_t)PyBytes_GET_SIZE(PyList_GET_ITEM(o->records, j)) == size)
            j++;
        if (j < n && (size_t)(j - i) < fit) {
            size_t last = (size_t)PyBytes_GET_SIZE(PyList_GET_ITEM(o->records, j));
            if (last > 0 && last < size)
                j++; /* a shorter record may end a run */
        }
        size_t segs = (size_t)(j - i), total = 0;
        for (Py_ssize_t r = i; r < j; r++)
            total += (size_t)PyBytes_GET_SIZE(PyList_GET_ITEM(o->records, r));
        uint32_t tcplen = (uint32_t)(TCP_TS_HL + total);
        uint8_t *h = heads + head * (size_t)nmsg, *ip = h + 24, *tcp = ip + iphl;
        uint16_t vnet[4]; /* after flags and gso_type (bytes): hdr_len, gso_size, csum_start, csum_offset */
        h[0] = 1;        /* VIRTIO_NET_HDR_F_NEEDS_CSUM */
        h[1] = segs > 1 ? (w->v4 ? 1 : 4) : 0; /* GSO_TCPV4 / GSO_TCPV6 */
        vnet[0] = (uint16_t)(segs > 1 ? csum_start + TCP_TS_HL : 0);
        vnet[1] = (uint16_t)(segs > 1 ? size : 0);
        vnet[2] = (uint16_t)csum_start;
        vnet[3] = 16;    /* the TCP checksum's offset */
        memcpy(h + 2, vnet, 8); /* native byte order, as packetsend.py's VNET_HDR */
        memcpy(h + 10, w->eth, 14);
        uint32_t id = w->ident < 0 ? 0 : (uint32_t)w->ident;
        if (w->v4) {
            uint32_t tot = 20 + tcplen;
            ip[0] = 0x45;
            ip[1] = 0;
            put16(ip + 2, tot);
            put16(ip + 4, id);
            put16(ip + 6, 0x4000);
            ip[8] = (uint8_t)w->ttl;
            ip[9] = 6;
            put16(ip + 10, ~fold16(w->hsum + tot + id) & 0xFFFF);
            memcpy(ip + 12, w->src, 4);
            memcpy(ip + 16, w->dst, 4);
            if (w->ident >= 0)
                w->ident = (int)((id + segs) & 0xFFFF);
        } else {
            put32(ip, 6u << 28 | w->label);
            put16(ip + 4, tcplen);
            ip[6] = 6;
            ip[7] = (uint8_t)w->ttl;
            memcpy(ip + 8, w->src, 16);
            memcpy(ip + 24, w->dst, 16);
        }
        put16(tcp, w->lport);
        put16(tcp + 2, w->rport);
        put32(tcp + 4, w->seq);
        put32(tcp + 8, w->ack);
        put16(tcp + 12, 8u << 12 | ACK | PSH);
        put16(tcp + 14, w->window);
        put16(tcp + 16, fold16(w->psum + tcplen)); /* the pseudo-header's sum: the kernel finishes it */
        put16(tcp + 18, 0);
        put32(tcp + 20, 0x0101080A);
        put32(tcp + 24, w->tsval);
        put32(tcp + 28, w->tsecr);
        struct msghdr *mh = &msgs[nmsg].msg_hdr;
        mh->msg_iov = &iov[k];
        iov[k].iov_base = h;
        iov[k++].iov_len = head;
        for (Py_ssize_t r = i; r < j; r++) {
            PyObject *rec = PyList_GET_ITEM(o->records, r);
            iov[k].iov_base = PyBytes_AS_STRING(rec);
            iov[k++].iov_len = (size_t)PyBytes_GET_SIZE(rec);
        }
        mh->msg_iovlen = (size_t)(&iov[k] - mh->msg_iov);
        nmsg++;
        w->seq += (uint32_t)total;
        w->segments += (long)segs;
        w->nbytes += (long)total;
        if (segs > 1) {
            self->tx_batches++;
            self->tx_batched += (long long)segs;
        }
        i = j;
    }
    for (int i = 0; i < nmsg;) {
        int r = sendmmsg(w->fd, &msgs[i], (unsigned)(nmsg - i), MSG_DONTWAIT);
        if (r > 0) {
            i += r;
            continue;
        }
        count_error(&self->errors, r < 0 ? errno : EIO, 1); /* this frame: counted, the rest tried on */
        i++;
    }
    PyMem_Free(heads);
    PyMem_Free(msgs);
    PyMem_Free(iov);
    return 0;
}

/* Give every flow's count and every connection's records back (flow_sent; sealed_run, or
 * sent_run for the records the writer sent itself). */
static int writer_flush(Writer *self, PyObject *endpoint, PyObject *now)
{
    int rc = 0;
    for (int i = 0; i < self->nflows; i++) {
        Flow *f = &self->flows[i];
        if (rc == 0 && f->count) {
            PyObject *res = call(endpoint, M_flow_sent, "(OllO)", f->flow, f->count, f->nbytes, now);
            if (res == NULL)
                rc = -1;
            Py_XDECREF(res);
        }
        Py_CLEAR(f->flow);
    }
    self->nflows = 0;
    for (int i = 0; i < self->nouts; i++) {
        Out *o = &self->outs[i];
        if (rc == 0 && out_seal(o) < 0)
            rc = -1;
        if (rc == 0) {
            out_tag(o);
            PyObject *res;
            if (o->wire.fd < 0)
                res = call(endpoint, M_sealed_run, "(OOKO)", o->conn, o->records,
                                          (unsigned long long)o->counter, now);
            else
                res = wire_send(self, o) < 0 ? NULL : call(
                    endpoint, M_sent_run, "(OKllklO)", o->conn, (unsigned long long)o->counter, o->wire.segments,
                    o->wire.nbytes, (unsigned long)o->wire.seq, o->wire.v4 ? o->wire.segments : 0L, now);
            if (res == NULL)
                rc = -1;
            Py_XDECREF(res);
        }
        out_clear(o);
    }
    self->nouts = 0;
    return rc;
}

/* ``src`` as the socket module gives a sender's address: (host, port) or (host, port, flowinfo,
 * scope_id); the client's flow table is keyed by it. */
static PyObject *sockaddr_tuple(const struct sockaddr *src)
{
    char host[INET6_ADDRSTRLEN];
    if (src->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)src;
        if (inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof host) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(sHkk)", host, ntohs(s6->sin6_port), (unsigned long)ntohl(s6->sin6_flowinfo),
                             (unsigned long)s6->sin6_scope_id);
    }
    if (src->sa_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)src;
        if (inet_ntop(AF_INET, &s4->sin_addr, host, sizeof host) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(sH)", host, ntohs(s4->sin_port));
    }
    PyErr_Format(PyExc_ValueError, "a datagram from an address of family %d", (int)src->sa_family);
    return NULL;
}

/* The flow of a datagram from ``src`` (or the one flow ``key`` of a target socket): found, or
 * started from the endpoint's fast_flow.  NULL with no exception: the datagram takes the full path. */
static Flow *flow_for(Writer *self, const struct sockaddr *src, socklen_t srclen, PyObject *key, PyObject *endpoint,
                      PyObject *now)
{
    for (int i = 0; i < self->nflows; i++) {
        Flow *f = &self->flows[i];
        if (key != Py_None || (f->keylen == srclen && memcmp(f->key, src, srclen) == 0))
            return f;
    }
    if ((self->nflows == MAXFLOWS || self->nouts == MAXRUNS) && writer_flush(self, endpoint, now) < 0)
        return NULL;
    PyObject *source = key == Py_None ? sockaddr_tuple(src) : Py_NewRef(key);
    if (source == NULL)
        return NULL;
    PyObject *st = call(endpoint, M_fast_flow, "(OO)", source, now);
    Py_DECREF(source);
    if (st == NULL || st == Py_None) {
        Py_XDECREF(st);
        return NULL;
    }
    /* (flow, conn, flow_id, limit, (key, person, context), counter) */
    PyObject *flow, *conn, *mac;
    unsigned long flow_id, limit;
    unsigned long long counter;
    const char *k, *person, *context;
    Py_ssize_t klen, plen, clen;
    if (!PyArg_ParseTuple(st, "OOkkOK", &flow, &conn, &flow_id, &limit, &mac, &counter) ||
        !PyArg_ParseTuple(mac, "y#y#y#", &k, &klen, &person, &plen, &context, &clen)) {
        Py_DECREF(st);
        return NULL;
    }
    if (klen > 64 || plen > 16 || limit > 0xFFFF - DATA_HEAD - 16) {
        Py_DECREF(st);
        PyErr_SetString(PyExc_ValueError, "fast_flow: a key, personalization or limit the writer cannot hold");
        return NULL;
    }
    int o = 0;
    while (o < self->nouts && self->outs[o].conn != conn)
        o++;
    if (o == self->nouts) { /* the connection's first flow in this wake-up */
        Out *out = &self->outs[o];
        memset(out, 0, sizeof *out);
        out->budget = limit + DATA_HEAD;
        out->frames = PyMem_Malloc(out->budget);
        out->records = PyList_New(0);
        if (out->frames == NULL || out->records == NULL) {
            PyMem_Free(out->frames);
            Py_XDECREF(out->records);
            Py_DECREF(st);
            PyErr_NoMemory();
            return NULL;
        }
        Py_INCREF(conn);
        out->conn = conn;
        out->counter = counter;
        b2b_init(&out->mac, 8, (const uint8_t *)k, (size_t)klen, (const uint8_t *)person, (size_t)plen);
        b2b_update(&out->mac, (const uint8_t *)context, (size_t)clen);
        self->nouts++;
        out->wire.fd = -1;
        if (self->wire_of != NULL && self->wire_of != Py_None) {
            PyObject *wire = PyObject_CallFunctionObjArgs(self->wire_of, conn, now, NULL);
            int bad = wire == NULL || wire_from(&out->wire, wire) < 0;
            Py_XDECREF(wire);
            if (bad) {
                Py_DECREF(st);
                return NULL;
            }
        }
    }
    Flow *f = &self->flows[self->nflows++];
    memset(f, 0, sizeof *f);
    Py_INCREF(flow);
    f->flow = flow;
    if (key == Py_None) {
        memcpy(f->key, src, srclen <= sizeof f->key ? srclen : sizeof f->key);
        f->keylen = srclen <= sizeof f->key ? srclen : 0;
    }
    f->out = o;
    f->flow_id = (uint32_t)flow_id;
    f->limit = limit;
    Py_DECREF(st);
    return f;
}

PyDoc_STRVAR(fill_doc,
"fill(fd, endpoint, now, key, batch, budget, wire=None)\n--\n\n"
"Read the application-side socket ``fd`` until EAGAIN or ``batch`` datagrams / ``budget`` bytes:\n"
"the datagrams of every flow whose connection is ESTABLISHED over tcp become DATA frames in\n"
"records sealed here (endpoint.fast_flow, flow_sent, sealed_run).  ``key``: the flow of a\n"
"target socket (server), or None: the flow is the sender's address (client).  ``wire(conn,\n"
"now)``, asked once per connection and call: how to send its records as segments from here on\n"
"the packet send path (then endpoint.sent_run instead of sealed_run), or None.  Returns None\n"
"when done, or ``(address, datagram)`` for the caller to pass to send_app / send_target\n"
"before calling again (the address None on a target socket).");

static PyObject *fill_reads(Writer *self, int fd, PyObject *endpoint, PyObject *now, PyObject *key, int batch,
                            long budget);

/* ``Writer.fill``, for Python and for the wait loop: ``wire`` (borrowed) for this call. */
static PyObject *fill(Writer *self, PyObject *wire, int fd, PyObject *endpoint, PyObject *now, PyObject *key,
                      int batch, long budget)
{
    self->wire_of = wire;
    PyObject *res = fill_reads(self, fd, endpoint, now, key, batch, budget);
    self->wire_of = NULL;
    return res;
}

static PyObject *Writer_fill(Writer *self, PyObject *args)
{
    int fd, batch;
    long budget;
    PyObject *endpoint, *now, *key, *wire = Py_None;
    if (!PyArg_ParseTuple(args, "iOOOil|O:fill", &fd, &endpoint, &now, &key, &batch, &budget, &wire))
        return NULL;
    return fill(self, wire, fd, endpoint, now, key, batch, budget);
}

static PyObject *fill_reads(Writer *self, int fd, PyObject *endpoint, PyObject *now, PyObject *key, int batch,
                            long budget)
{
    for (;;) {
        if (self->in.idx >= self->in.n) {
            int got = batch_read(&self->in, fd, batch, budget, key == Py_None, 0);
            if (got == 0)
                break;
            if (got < 0) {
                int err = errno;
                if (writer_flush(self, endpoint, now) < 0)
                    return NULL;
                errno = err;
                return PyErr_SetFromErrno(PyExc_OSError);
            }
        }
        Batch *in = &self->in;
        int i = in->idx++;
        const uint8_t *d = in->bufs + (size_t)i * BUFSZ;
        size_t n = in->msgs[i].msg_len;
        const struct sockaddr *src = (const struct sockaddr *)&in->names[i];
        socklen_t srclen = in->msgs[i].msg_hdr.msg_namelen;
        if (in->msgs[i].msg_hdr.msg_flags & MSG_TRUNC)
            goto full;
        Flow *f = flow_for(self, src, srclen, key, endpoint, now);
        if (f == NULL) {
            if (PyErr_Occurred()) {
                GIVE_BACK_KEEPING_ERROR(writer_flush(self, endpoint, now));
                return NULL;
            }
            goto full;
        }
        if (n > f->limit)
            goto full; /* oversized: send_app counts it and says so */
        Out *o = &self->outs[f->out];
        size_t frame = DATA_HEAD + n;
        if (o->fill && o->fill + frame > o->budget && out_seal(o) < 0) {
            GIVE_BACK_KEEPING_ERROR(writer_flush(self, endpoint, now));
            return NULL;
        }
        uint8_t *w = o->frames + o->fill;
        w[0] = DATA;
        put16(w + 1, (uint32_t)(4 + n));
        put32(w + 3, f->flow_id);
        memcpy(w + DATA_HEAD, d, n);
        o->fill += frame;
        f->count++;
        f->nbytes += (long)n;
        continue;
    full:
        if (writer_flush(self, endpoint, now) < 0)
            return NULL;
        if (key != Py_None)
            return Py_BuildValue("(Oy#)", Py_None, (const char *)d, (Py_ssize_t)n);
        PyObject *addr = sockaddr_tuple(src);
        return addr == NULL ? NULL : Py_BuildValue("(Ny#)", addr, (const char *)d, (Py_ssize_t)n);
    }
    batch_end(&self->in);
    if (writer_flush(self, endpoint, now) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static void Writer_dealloc(Writer *self)
{
    for (int i = 0; i < self->nflows; i++)
        Py_CLEAR(self->flows[i].flow);
    for (int i = 0; i < self->nouts; i++)
        out_clear(&self->outs[i]);
    PyMem_RawFree(self->in.bufs);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(writer_take_errors_doc,
"take_errors()\n--\n\n"
"The writer's own sends (``fill``'s ``wire``) that failed since the last call: ``[(errno, frames)]``.");

static PyObject *Writer_take_errors(Writer *self, PyObject *Py_UNUSED(ignored))
{
    return errors_take(&self->errors);
}

static PyMethodDef Writer_methods[] = {
    {"fill", (PyCFunction)Writer_fill, METH_VARARGS, fill_doc},
    {"take_errors", (PyCFunction)Writer_take_errors, METH_NOARGS, writer_take_errors_doc},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Writer_members[] = {
    {"tx_batches", T_LONGLONG, offsetof(Writer, tx_batches), READONLY,
     "Its own sends of several segments (GSO: the kernel cuts them)."},
    {"tx_batched", T_LONGLONG, offsetof(Writer, tx_batched), READONLY, "The segments those sends made."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "rsockd.dataplane._datapath.Writer",
    .tp_doc = PyDoc_STR("Frames and seals application datagrams in batches (see the module)."),
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = io_new,
    .tp_dealloc = (destructor)Writer_dealloc,
    .tp_methods = Writer_methods,
    .tp_members = Writer_members,
};

PyDoc_STRVAR(tag_doc,
"tag(key, person, context, data)\n--\n\n"
"The 8-byte keyed BLAKE2b of ``context + data`` (the record tag's construction), for tests.");

static PyObject *datapath_tag(PyObject *mod, PyObject *args)
{
    const char *k, *person, *context, *data;
    Py_ssize_t klen, plen, clen, dlen;
    if (!PyArg_ParseTuple(args, "y#y#y#y#:tag", &k, &klen, &person, &plen, &context, &clen, &data, &dlen))
        return NULL;
    if (klen > 64 || plen > 16) {
        PyErr_SetString(PyExc_ValueError, "tag: a key of at most 64 bytes, a personalization of at most 16");
        return NULL;
    }
    b2b s;
    uint8_t out[8];
    b2b_init(&s, 8, (const uint8_t *)k, (size_t)klen, (const uint8_t *)person, (size_t)plen);
    b2b_update(&s, (const uint8_t *)context, (size_t)clen);
    b2b_update(&s, (const uint8_t *)data, (size_t)dlen);
    b2b_final(&s, out);
    return PyBytes_FromStringAndSize((const char *)out, 8);
}

PyDoc_STRVAR(tags_doc,
"tags(key, person, context, counters, frames)\n--\n\n"
"The tags of up to four records whose frames are of one length, as the reader and the writer compute\n"
"them (four at once where the CPU can, ``TAGS_AT_ONCE``): tag(key, person, context, counter + frames)\n"
"for each counter (8 bytes) and frames, as a list.");

static PyObject *datapath_tags(PyObject *mod, PyObject *args)
{
    const char *k, *person, *context;
    Py_ssize_t klen, plen, clen;
    PyObject *counters, *frames;
    if (!PyArg_ParseTuple(args, "y#y#y#O!O!:tags", &k, &klen, &person, &plen, &context, &clen, &PyList_Type,
                          &counters, &PyList_Type, &frames))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(counters);
    if (klen > 64 || plen > 16 || count < 1 || count > 4 || PyList_GET_SIZE(frames) != count) {
        PyErr_SetString(PyExc_ValueError, "tags: a key of at most 64 bytes, a personalization of at most 16, "
                                          "1 to 4 counters and as many frames");
        return NULL;
    }
    const uint8_t *cs[4], *fs[4];
    Py_ssize_t n = -1;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *c = PyList_GET_ITEM(counters, i), *f = PyList_GET_ITEM(frames, i);
        if (!PyBytes_Check(c) || PyBytes_GET_SIZE(c) != 8 || !PyBytes_Check(f) ||
            (n >= 0 && PyBytes_GET_SIZE(f) != n)) {
            PyErr_SetString(PyExc_ValueError, "tags: counters of 8 bytes, frames (bytes) of one length");
            return NULL;
        }
        n = PyBytes_GET_SIZE(f);
        cs[i] = (const uint8_t *)PyBytes_AS_STRING(c);
        fs[i] = (const uint8_t *)PyBytes_AS_STRING(f);
    }
    b2b s;
    uint8_t out[4][8];
    b2b_init(&s, 8, (const uint8_t *)k, (size_t)klen, (const uint8_t *)person, (size_t)plen);
    b2b_update(&s, (const uint8_t *)context, (size_t)clen);
    record_tags(&s, (int)count, cs, fs, (size_t)n, out);
    PyObject *list = PyList_New(count);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *t = PyBytes_FromStringAndSize((const char *)out[i], 8);
        if (t == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, t);
    }
    return list;
}

PyDoc_STRVAR(take_errors_doc,
"take_errors()\n--\n\n"
"What failed to send to the application side since the last call: ``([(errno, datagrams)], gso_refused)``,\n"
"``gso_refused`` true once a GSO send was refused (every datagram then goes on its own).");

static PyObject *Reader_take_errors(Reader *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *list = errors_take(&self->errors);
    return list == NULL ? NULL : Py_BuildValue("(NO)", list, self->gso_refused ? Py_True : Py_False);
}

/* -- the raw send path: a run of segments in one sendmmsg ---------------------------------------- */

/* The TCP checksum of ``header`` + ``payload`` (core/packet.py segment_checksum): the pseudo-header
 * sum ``psum`` (without the length), the length, and both parts as 16-bit words. */
static uint16_t tcp_checksum(uint32_t psum, const uint8_t *h, size_t hl, const uint8_t *p, size_t n)
{
    size_t len = hl + n;
    uint64_t sum = psum + (len >> 16) + (len & 0xFFFF);
    for (size_t i = 0; i + 1 < hl; i += 2)
        sum += (uint32_t)h[i] << 8 | h[i + 1];
    size_t i = 0;
    for (; i + 8 <= n; i += 8) { /* four words at a time */
        uint64_t w;
        memcpy(&w, p + i, 8);
        w = __builtin_bswap64(w);
        sum += (w >> 48) + ((w >> 32) & 0xFFFF) + ((w >> 16) & 0xFFFF) + (w & 0xFFFF);
    }
    for (; i + 1 < n; i += 2)
        sum += (uint32_t)p[i] << 8 | p[i + 1];
    if (i < n)
        sum += (uint32_t)p[i] << 8; /* an odd byte, padded */
    uint32_t s = (uint32_t)(sum % 0xFFFF);
    return s ? (uint16_t)(~s & 0xFFFF) : 0;
}

PyDoc_STRVAR(send_raw_doc,
"send_raw(fd, dst, iphdr, ident, step, header, payloads, psum, pktinfo)\n--\n\n"
"Send a run of TCP segments (endpoint.Transmit: ``header`` is the first one's, each next one's\n"
"sequence number moved on by the payloads before it) through the raw socket ``fd`` to ``dst``\n"
"(packed), all in one ``sendmmsg``, as rawsock.py does one ``sendmsg`` at a time.  IPv4:\n"
"``iphdr`` is the 20-byte header template, its ID the ``ident``, ``ident + step``, ... of each\n"
"segment, and the TCP checksum is computed here from ``psum`` (the pseudo-header sum, no\n"
"length).  IPv6: ``iphdr`` is empty, the kernel makes the header and the checksum, and\n"
"``pktinfo`` is the IPV6_PKTINFO data that pins the source.  Returns the sends that failed, as\n"
"``[(errno, segments)]``.");

static PyObject *datapath_send_raw(PyObject *mod, PyObject *args)
{
    (void)mod;
    int fd;
    unsigned int ident, step;
    unsigned long psum;
    Py_buffer dst, iph, hdr, pkt;
    PyObject *payloads;
    if (!PyArg_ParseTuple(args, "iy*y*IIy*O!ky*:send_raw", &fd, &dst, &iph, &ident, &step, &hdr, &PyList_Type,
                          &payloads, &psum, &pkt))
        return NULL;
    PyObject *res = NULL;
    Py_ssize_t n = PyList_GET_SIZE(payloads);
    int v4 = dst.len == 4;
    uint8_t *heads = NULL;
    struct mmsghdr *msgs = NULL;
    struct iovec *iov = NULL;
    Py_buffer *bufs = NULL;
    Py_ssize_t nbufs = 0; /* payload buffers held */
    if ((dst.len != 4 && dst.len != 16) || (v4 && iph.len != 20) || (!v4 && iph.len != 0) || hdr.len < 20 ||
        hdr.len > 60 || (hdr.len & 1) || (pkt.len != 0 && pkt.len != sizeof(struct in6_pktinfo))) {
        PyErr_SetString(PyExc_ValueError, "send_raw: a destination, IP header, TCP header or run it cannot send");
        goto done;
    }
    size_t hl = (size_t)hdr.len, per = (size_t)iph.len + hl;
    heads = PyMem_Malloc(per * (size_t)(n ? n : 1));
    msgs = PyMem_Calloc((size_t)(n ? n : 1), sizeof *msgs);
    iov = PyMem_Malloc(3 * sizeof *iov * (size_t)(n ? n : 1));
    bufs = PyMem_Malloc(sizeof *bufs * (size_t)(n ? n : 1));
    if (heads == NULL || msgs == NULL || iov == NULL || bufs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    struct sockaddr_in s4;
    struct sockaddr_in6 s6;
    memset(&s4, 0, sizeof s4);
    memset(&s6, 0, sizeof s6);
    s4.sin_family = AF_INET;
    s6.sin6_family = AF_INET6;
    if (v4)
        memcpy(&s4.sin_addr, dst.buf, 4);
    else
        memcpy(&s6.sin6_addr, dst.buf, 16);
    union {
        char buf[CMSG_SPACE(sizeof(struct in6_pktinfo))];
        struct cmsghdr align;
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    if (pkt.len) {
        struct cmsghdr *c = (struct cmsghdr *)ctl.buf;
        c->cmsg_level = IPPROTO_IPV6;
        c->cmsg_type = IPV6_PKTINFO;
        c->cmsg_len = CMSG_LEN(sizeof(struct in6_pktinfo));
        memcpy(CMSG_DATA(c), pkt.buf, sizeof(struct in6_pktinfo));
    }
    uint32_t seq = be32((const uint8_t *)hdr.buf + 4);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(payloads, i), &bufs[i], PyBUF_SIMPLE) < 0)
            goto done;
        nbufs++;
        const uint8_t *p = (const uint8_t *)bufs[i].buf;
        size_t plen = (size_t)bufs[i].len;
        uint8_t *ip = heads + per * (size_t)i, *tcp = ip + iph.len;
        memcpy(ip, iph.buf, (size_t)iph.len);
        memcpy(tcp, hdr.buf, hl);
        put32(tcp + 4, seq);
        seq += (uint32_t)plen;
        int k = 0;
        if (v4) {
            uint16_t id = (uint16_t)(ident + step * (unsigned int)i);
            put16(ip + 4, id);
            uint16_t check = tcp_checksum((uint32_t)psum, tcp, hl, p, plen);
            put16(tcp + 16, check);
            iov[3 * i].iov_base = ip;
            iov[3 * i].iov_len = 20;
            k = 1;
        }
        iov[3 * i + k].iov_base = tcp;
        iov[3 * i + k].iov_len = hl;
        iov[3 * i + k + 1].iov_base = (void *)p;
        iov[3 * i + k + 1].iov_len = plen;
        struct msghdr *mh = &msgs[i].msg_hdr;
        mh->msg_iov = &iov[3 * i];
        mh->msg_iovlen = (size_t)(k + 2);
        mh->msg_name = v4 ? (void *)&s4 : (void *)&s6;
        mh->msg_namelen = v4 ? sizeof s4 : sizeof s6;
        if (pkt.len) {
            mh->msg_control = ctl.buf;
            mh->msg_controllen = sizeof ctl.buf;
        }
    }
    struct {
        int err;
        long count;
    } errs[8];
    int nerrs = 0;
    for (Py_ssize_t i = 0; i < n;) {
        int r = sendmmsg(fd, &msgs[i], (unsigned int)(n - i), MSG_DONTWAIT);
        if (r > 0) {
            i += r;
            continue;
        }
        int err = r < 0 ? errno : EIO, j = 0; /* the first one failed: counted, the rest tried on */
        while (j < nerrs && errs[j].err != err)
            j++;
        if (j == 8) /* more kinds than that in one run: counted as the last one */
            j = 7;
        else if (j == nerrs) {
            errs[nerrs].err = err;
            errs[nerrs++].count = 0;
        }
        errs[j].count++;
        i++;
    }
    res = PyList_New(nerrs);
    for (int j = 0; res != NULL && j < nerrs; j++) {
        PyObject *item = Py_BuildValue("(il)", errs[j].err, errs[j].count);
        if (item == NULL)
            Py_CLEAR(res);
        else
            PyList_SET_ITEM(res, j, item);
    }
done:
    for (Py_ssize_t i = 0; i < nbufs; i++)
        PyBuffer_Release(&bufs[i]);
    PyMem_Free(bufs);
    PyMem_Free(heads);
    PyMem_Free(msgs);
    PyMem_Free(iov);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&iph);
    PyBuffer_Release(&hdr);
    PyBuffer_Release(&pkt);
    return res;
}

static void Reader_dealloc(Reader *self)
{
    for (int i = 0; i < self->nruns; i++)
        run_clear(&self->runs[i]);
    PyMem_RawFree(self->in.bufs);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Reader_methods[] = {
    {"drain", (PyCFunction)Reader_drain, METH_VARARGS, drain_doc},
    {"take_errors", (PyCFunction)Reader_take_errors, METH_NOARGS, take_errors_doc},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Reader_members[] = {
    {"tags_ahead", T_LONGLONG, offsetof(Reader, tags_ahead), READONLY,
     "Records whose tag was computed with an earlier record's (four at once), since the reader was made."},
    {"rx_batches", T_LONGLONG, offsetof(Reader, rx_batches), READONLY,
     "Reads that carried several segments (GRO), since the reader was made."},
    {"rx_batched", T_LONGLONG, offsetof(Reader, rx_batched), READONLY, "The segments those reads carried."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "rsockd.dataplane._datapath.Reader",
    .tp_doc = PyDoc_STR("Reads steered segments of a tunnel socket in batches (see the module)."),
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = io_new,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_methods = Reader_methods,
    .tp_members = Reader_members,
};

/* -- the wait loop: the relay's sockets served from here while datagrams keep coming ------------ */

/* What a socket of the relay's epoll is, for the loop: a tunnel socket (the reader takes it), an
 * application-side socket (the writer takes it), or anything else (the relay's ``_handle``). */
enum { W_OTHER = 0, W_TUNNEL, W_FILL };

typedef struct {
    int kind;
    int family, port;   /* W_TUNNEL */
    PyObject *fallback; /* W_TUNNEL: the server's local_ip (packed) or None; strong */
    PyObject *key;      /* W_FILL: the flow's key (server) or None (the client's application socket); strong */
} Watch;

#define POLL_EVENTS 64 /* dataplane/relay.py POLL_EVENTS: sockets served per epoll_wait */

typedef struct {
    PyObject_HEAD
    int epfd;
    int batch;   /* datagrams and bytes read per socket and wake-up (relay.BATCH, READ_BUDGET) */
    long budget;
    Watch *w;    /* by fd */
    int cap;
} Serve;

static double monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic()'s clock */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static PyObject *Serve_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    int epfd, batch;
    long budget;
    static char *kw[] = {"epfd", "batch", "budget", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iil:Serve", kw, &epfd, &batch, &budget))
        return NULL;
    Serve *self = (Serve *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->epfd = epfd;
        self->batch = batch;
        self->budget = budget;
    }
    return (PyObject *)self;
}

static void watch_clear(Watch *w)
{
    Py_CLEAR(w->fallback);
    Py_CLEAR(w->key);
    w->kind = W_OTHER;
}

static void Serve_dealloc(Serve *self)
{
    for (int i = 0; i < self->cap; i++)
        watch_clear(&self->w[i]);
    PyMem_Free(self->w);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Watch *watch_at(Serve *self, int fd)
{
    if (fd < 0)
        return NULL;
    if (fd >= self->cap) {
        int cap = fd + 64;
        Watch *w = PyMem_Realloc(self->w, sizeof(Watch) * (size_t)cap);
        if (w == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        memset(w + self->cap, 0, sizeof(Watch) * (size_t)(cap - self->cap));
        self->w = w;
        self->cap = cap;
    }
    return &self->w[fd];
}

static PyObject *Serve_tunnel(Serve *self, PyObject *args)
{
    int fd, family, port;
    PyObject *fallback;
    if (!PyArg_ParseTuple(args, "iiiO:tunnel", &fd, &family, &port, &fallback))
        return NULL;
    const uint8_t *fb;
    Py_ssize_t fblen;
    if (packed_fallback(fallback, "tunnel", &fb, &fblen) < 0)
        return NULL;
    Watch *w = watch_at(self, fd);
    if (w == NULL)
        return NULL;
    watch_clear(w);
    w->kind = W_TUNNEL;
    w->family = family;
    w->port = port;
    w->fallback = Py_NewRef(fallback);
    Py_RETURN_NONE;
}

static PyObject *Serve_fill(Serve *self, PyObject *args)
{
    int fd;
    PyObject *key;
    if (!PyArg_ParseTuple(args, "iO:fill", &fd, &key))
        return NULL;
    Watch *w = watch_at(self, fd);
    if (w == NULL)
        return NULL;
    watch_clear(w);
    w->kind = W_FILL;
    w->key = Py_NewRef(key);
    Py_RETURN_NONE;
}

static PyObject *Serve_forget(Serve *self, PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd >= 0 && fd < self->cap)
        watch_clear(&self->w[fd]);
    Py_RETURN_NONE;
}

/* ``relay.name(a, b, c)`` (from the first NULL on, fewer arguments), its result dropped: 0, or -1
 * with the error set. */
static int relay_call3(PyObject *relay, PyObject *name, PyObject *a, PyObject *b, PyObject *c)
{
    PyObject *stack[4] = {relay, a, b, c};
    size_t n = b == NULL ? 2 : c == NULL ? 3 : 4;
    PyObject *res = PyObject_VectorcallMethod(name, stack, n, NULL);
    Py_XDECREF(res);
    return res == NULL ? -1 : 0;
}

static int relay_call(PyObject *relay, PyObject *name, PyObject *a, PyObject *b)
{
    return relay_call3(relay, name, a, b, NULL);
}

/* An OSError from a read (the reader's or the writer's) goes to the relay's ``failed``, as the
 * Python loop counts it there, and the loop reads on; any other error ends the run. */
static int read_failed(PyObject *relay, PyObject *failed, PyObject *key)
{
    if (!PyErr_ExceptionMatches(PyExc_OSError))
        return -1;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    int rc = relay_call(relay, failed, key != NULL ? key : value, key != NULL ? value : NULL);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return rc;
}

/* One readable tunnel socket: what ``Relay._drain`` and ``_pump`` do, the reader's calls made from here. */
static int serve_tunnel(Serve *self, Reader *reader, PyObject *relay, PyObject *endpoint, int fd, const Watch *w,
                        int pktinfo, int *gso, PyObject *sink, PyObject *now)
{
    const uint8_t *fb;
    Py_ssize_t fblen;
    packed_fallback(w->fallback, "tunnel", &fb, &fblen); /* checked by Serve.tunnel */
    PyObject *fallback = Py_NewRef(w->fallback); /* ``w`` may be forgotten by a call below */
    int family = w->family, port = w->port, rc = 0;
    for (;;) {
        PyObject *back = drain(reader, sink, *gso, fd, family, port, endpoint, now, pktinfo, fb, fblen, self->batch,
                               self->budget);
        if (back == NULL) {
            if (read_failed(relay, M_tunnel_failed, NULL) < 0) {
                rc = -1;
                break;
            }
            continue;
        }
        if (reader->errors.n || (reader->gso_refused && *gso)) {
            *gso = 0; /* the relay turns its own GSO off on hearing of it */
            if (relay_call(relay, M_tunnel_failed, Py_None, NULL) < 0) {
                Py_DECREF(back);
                rc = -1;
                break;
            }
        }
        if (back == Py_None) {
            Py_DECREF(back);
            break;
        }
        rc = relay_call(relay, M_tunnel_back, back, now);
        Py_DECREF(back);
        if (rc < 0)
            break;
    }
    Py_DECREF(fallback);
    return rc < 0 ? -1 : relay_call(relay, M_pump, now, NULL);
}

/* One readable application-side socket: what ``Relay._fill`` and ``_pump`` do. */
static int serve_fill(Serve *self, Writer *writer, PyObject *relay, PyObject *endpoint, int fd, const Watch *w,
                      PyObject *wire, PyObject *now)
{
    PyObject *key = Py_NewRef(w->key); /* ``w`` may be forgotten by a call below */
    int rc = 0;
    for (;;) {
        PyObject *back = fill(writer, wire, fd, endpoint, now, key, self->batch, self->budget);
        if (back == NULL) {
            if (read_failed(relay, M_fill_failed, key) < 0) {
                rc = -1;
                break;
            }
            continue;
        }
        if (writer->errors.n && relay_call(relay, M_fill_failed, key, Py_None) < 0) {
            Py_DECREF(back);
            rc = -1;
            break;
        }
        if (back == Py_None) {
            Py_DECREF(back);
            break;
        }
        rc = relay_call3(relay, M_fill_back, key, back, now);
        Py_DECREF(back);
        if (rc < 0)
            break;
    }
    Py_DECREF(key);
    return rc < 0 ? -1 : relay_call(relay, M_pump, now, NULL);
}

PyDoc_STRVAR(serve_run_doc,
"run(relay, endpoint, reader, writer, until, pktinfo, gso, wire)\n--\n\n"
"``Relay._on_data``'s loop, from here: serve every ready socket of the epoll, then wait for the\n"
"next datagram in one ``epoll_wait`` for up to ``until`` (monotonic seconds; never past\n"
"``relay._timer_at``) and serve again, until nothing comes or ``relay.closing``.  A tunnel socket\n"
"(``tunnel``) is drained by ``reader`` and an application-side one (``fill``) filled by ``writer``\n"
"here, each handed-back segment or datagram going to ``relay._tunnel_back(back, now)`` /\n"
"``relay._fill_back(key, back, now)``, each failure to ``relay._tunnel_failed(error)`` /\n"
"``relay._fill_failed(key, error)`` (``error`` an OSError from a read, or None: sends failed),\n"
"then ``relay._pump(now)``; any other socket goes to ``relay._handle(fd)``.  ``pktinfo``,\n"
"``gso``: as ``Reader.drain``'s; ``wire``: as ``Writer.fill``'s.  Returns ``(loop, own)``: the\n"
"wake-ups asyncio gave and those of the loop's own wait.");

static PyObject *Serve_run(Serve *self, PyObject *args)
{
    PyObject *relay, *endpoint, *wire, *sink;
    Reader *reader;
    Writer *writer;
    double until;
    int pktinfo, gso;
    if (!PyArg_ParseTuple(args, "OOO!O!dppO:run", &relay, &endpoint, &ReaderType, &reader, &WriterType, &writer,
                          &until, &pktinfo, &gso, &wire))
        return NULL;
    sink = PyObject_GetAttr(relay, A_sink_of);
    if (sink == NULL)
        return NULL;
    long loop = 0, own = 0;
    int timeout_ms = 0;
    struct epoll_event evs[POLL_EVENTS];
    for (;;) {
        int n;
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait(self->epfd, evs, POLL_EVENTS, timeout_ms);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR && PyErr_CheckSignals() == 0)
                continue; /* as select.epoll.poll does (PEP 475) */
            if (!PyErr_Occurred())
                PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        if (n == 0)
            break;
        if (timeout_ms)
            own++;
        else
            loop++;
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            const Watch *w = fd >= 0 && fd < self->cap ? &self->w[fd] : NULL; /* looked up now: an earlier
                                                                                 socket's calls may forget it */
            int rc;
            if (w != NULL && w->kind != W_OTHER) {
                PyObject *now = PyFloat_FromDouble(monotonic());
                if (now == NULL)
                    goto fail;
                rc = w->kind == W_TUNNEL ? serve_tunnel(self, reader, relay, endpoint, fd, w, pktinfo, &gso, sink, now)
                                         : serve_fill(self, writer, relay, endpoint, fd, w, wire, now);
                Py_DECREF(now);
            } else {
                PyObject *o = PyLong_FromLong(fd);
                rc = o == NULL ? -1 : relay_call(relay, M_handle, o, NULL);
                Py_XDECREF(o);
            }
            if (rc < 0)
                goto fail;
        }
        PyObject *closing = PyObject_GetAttr(relay, A_closing);
        int is_closing = closing == NULL ? -1 : PyObject_IsTrue(closing);
        Py_XDECREF(closing);
        if (is_closing < 0)
            goto fail;
        if (is_closing)
            break;
        PyObject *at = PyObject_GetAttr(relay, A_timer_at);
        double timer_at = at == NULL ? -1.0 : PyFloat_AsDouble(at);
        Py_XDECREF(at);
        if (PyErr_Occurred())
            goto fail;
        double left = (timer_at < until ? timer_at : until) - monotonic();
        if (left <= 0)
            break;
        timeout_ms = (int)(left * 1000.0);
        if (timeout_ms < 1)
            timeout_ms = 1; /* as select.epoll.poll rounds a timeout up to whole milliseconds */
        else if ((double)timeout_ms < left * 1000.0)
            timeout_ms++;
    }
    Py_DECREF(sink);
    return Py_BuildValue("(ll)", loop, own);
fail:
    Py_DECREF(sink);
    return NULL;
}

static PyMethodDef Serve_methods[] = {
    {"tunnel", (PyCFunction)Serve_tunnel, METH_VARARGS,
     PyDoc_STR("tunnel(fd, family, port, fallback): the reader drains tunnel socket fd (as Reader.drain's).")},
    {"fill", (PyCFunction)Serve_fill, METH_VARARGS,
     PyDoc_STR("fill(fd, key): the writer fills from application-side socket fd (key: as Writer.fill's).")},
    {"forget", (PyCFunction)Serve_forget, METH_O, PyDoc_STR("forget(fd): fd goes to relay._handle again.")},
    {"run", (PyCFunction)Serve_run, METH_VARARGS, serve_run_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ServeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "rsockd.dataplane._datapath.Serve",
    .tp_doc = PyDoc_STR("The relay's wait loop over its epoll, its sockets served by a reader and a writer."),
    .tp_basicsize = sizeof(Serve),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Serve_new,
    .tp_dealloc = (destructor)Serve_dealloc,
    .tp_methods = Serve_methods,
};

static PyMethodDef module_methods[] = {
    {"send_raw", datapath_send_raw, METH_VARARGS, send_raw_doc},
    {"tag", datapath_tag, METH_VARARGS, tag_doc},
    {"tags", datapath_tags, METH_VARARGS, tags_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef datapath_module = {
    PyModuleDef_HEAD_INIT, "rsockd.dataplane._datapath",
    "The compiled data path: reader and writer (rsockd/dataplane/_datapath.c).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__datapath(void)
{
    if (PyType_Ready(&ReaderType) < 0 || PyType_Ready(&WriterType) < 0 || PyType_Ready(&ServeType) < 0)
        return NULL;
    struct { PyObject **slot; const char *name; } methods[] = {
        {&M_fast_conn, "fast_conn"}, {&M_steered_run, "steered_run"}, {&M_flow_sent, "flow_sent"},
        {&M_sealed_run, "sealed_run"}, {&M_sent_run, "sent_run"}, {&M_fast_flow, "fast_flow"},
        {&M_tunnel_back, "_tunnel_back"}, {&M_tunnel_failed, "_tunnel_failed"}, {&M_fill_back, "_fill_back"},
        {&M_fill_failed, "_fill_failed"}, {&M_handle, "_handle"}, {&M_pump, "_pump"}, {&A_closing, "closing"},
        {&A_timer_at, "_timer_at"}, {&A_sink_of, "_sink_of"},
    };
    for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
        if (*methods[i].slot == NULL && (*methods[i].slot = PyUnicode_InternFromString(methods[i].name)) == NULL)
            return NULL;
#if MULTI
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2") && !getenv("RSOCKD_TAGS_ONE_AT_A_TIME");
#endif
    PyObject *m = PyModule_Create(&datapath_module);
    if (m == NULL)
        return NULL;
#if MULTI
    if (PyModule_AddIntConstant(m, "TAGS_AT_ONCE", have_avx2 ? 4 : 1) < 0) {
#else
    if (PyModule_AddIntConstant(m, "TAGS_AT_ONCE", 1) < 0) {
#endif
        Py_DECREF(m);
        return NULL;
    }
    struct { const char *name; PyTypeObject *type; } types[] = {
        {"Reader", &ReaderType}, {"Writer", &WriterType}, {"Serve", &ServeType},
    };
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        Py_INCREF(types[i].type);
        if (PyModule_AddObject(m, types[i].name, (PyObject *)types[i].type) < 0) {
            Py_DECREF(types[i].type);
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
