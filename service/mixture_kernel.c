/* Fused CPU kernel of the diagonal-Gaussian mixture log-density and its gradients (float32).
 *
 * Built on first use by service/mixture_native.py (cc -O3 -march=native, cached per CPU);
 * service/gaussian.py keeps its PyTorch path where this cannot be built or does not apply.
 *
 * comp[n][m] = bias_m - 0.5 * sum_d (z_nd - mu_md)^2 / var_md,  bias_m = log w_m - 0.5 sum_d log(2 pi var_md)
 * log p[n]   = logsumexp_m comp[n][m]               (against the largest peak max_m bias_m in one pass;
 *                                                    a row far from every component: its own maximum)
 * r[n][m]    = exp(comp[n][m] - log p[n])           (responsibilities: never stored, recomputed)
 *
 * The quadratic is evaluated in centred form, (z - mu)^2 / var, so sharp components far from the
 * origin lose nothing to cancellation. LANES rows travel together in one SIMD vector (GCC/Clang
 * vector extensions: 16 with AVX-512, 8 with AVX2 where -march=native has them, narrower vectors or
 * scalar code elsewhere)
 * and the components' parameters are broadcast, so that every row costs the same few vector
 * instructions per component and nothing but log p leaves the kernel. The backward recomputes
 * r from log p and accumulates, in float over blocks of 1,024 rows and then in double,
 *   S0[m]    = sum_n g_n r_nm
 *   S1[d][m] = sum_n g_n r_nm (z_nd - mu_md)
 *   S2[d][m] = sum_n g_n r_nm (z_nd - mu_md)^2
 * from which the Python side forms the gradients of mu, log var and log w, and writes
 *   dz[n][d] = -g_n sum_m r_nm (z_nd - mu_md) / var_md.
 * The forward can also return dlogp/dz itself (g = 1): it costs a few multiply-adds per component
 * beside the exp it already made, and spares a backward that would recompute every exp.
 * Parameters arrive transposed, (D, M), and the bias as (M,).
 *
 * The Monte-Carlo form (mixture_mc_forward) takes the posteriors instead of the points: mu, sigma
 * (B, D) and the noise eps (T, B, D). Each vector holds LANES posteriors, forms z = mu + sigma eps
 * for one t at a time and keeps per-posterior running sums over t of log p, dlogp/dz and
 * eps dlogp/dz: the (T B, D) samples, their log p and their gradient never reach memory, and the
 * reparameterisation's backward (a reduction over t) is already done when the kernel returns.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 16 rows per vector where the CPU has 512-bit vectors (AVX-512F), 8 elsewhere */
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));
#define VALIGN (LANES * sizeof(float)) /* aligned_alloc of vectors */
#define BLOCK_FLUSH (1024 / LANES) /* blocks of LANES rows between float -> double flushes of the sums */

#if LANES == 16
static inline vf splat(float x) { return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
#else
static inline vf splat(float x) { return (vf){x, x, x, x, x, x, x, x}; }
#endif

#if defined(__AVX512F__) && LANES == 16
#include <immintrin.h>
static inline vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
#elif defined(__AVX__) && LANES == 8
#include <immintrin.h>
static inline vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
#else
static inline vf vmax(vf a, vf b) {
    vi take_b = b > a;
    return (vf)(((vi)b & take_b) | ((vi)a & ~take_b));
}
#endif

/* exp(x) for x <= 0 (arguments are shifted by the row maximum or by log p): Cody-Waite
 * reduction x = k ln2 + r, |r| <= ln2 / 2, the degree-7 Taylor polynomial of exp(r) (truncation
 * below 1e-8, under float rounding) and 2^k from the exponent bits (with AVX-512: k by one rounding
 * instruction and the product with 2^k by vscalefps, 4 fewer instructions per exp). x is clamped at -87 where
 * exp is about 1.6e-38 (the smallest normal float is 1.2e-38): no denormals, whose slow path
 * costs about 15x, and nothing a row sum of at least 1 could notice. */
static inline vf vexp(vf x) {
    x = vmax(x, splat(-87.0f));
    vf t = x * splat(1.44269504088896341f);
#if defined(__AVX512F__) && LANES == 16 /* k rounded and 2^k applied by one instruction each */
    vf kf = (vf)_mm512_roundscale_ps((__m512)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    vi k = __builtin_convertvector(t - splat(0.5f), vi); /* round half away for t <= 0 ... */
    vf kf = __builtin_convertvector(k, vf);              /* ... (truncation toward zero of t - 0.5) */
#endif
    vf r = x - kf * splat(0.693145751953125f);
    r = r - kf * splat(1.42860682030941723e-06f);
    vf p = splat(1.0f / 5040.0f);
    p = p * r + splat(1.0f / 720.0f);
    p = p * r + splat(1.0f / 120.0f);
    p = p * r + splat(1.0f / 24.0f);
    p = p * r + splat(1.0f / 6.0f);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
#if defined(__AVX512F__) && LANES == 16
    return (vf)_mm512_scalef_ps((__m512)p, (__m512)kf);
#else
    vi bits = (k + 127) << 23;
    return p * (vf)bits;
#endif
}

typedef struct {
    int64_t lo, hi, m, d;                  /* rows [lo, hi); lo is a multiple of LANES */
    int64_t n;                             /* all rows: the last block may be partial */
    const float *z, *mu_t, *iv_t, *bias;   /* z (N, D); mu_t, iv_t (D, M); bias (M,) */
    const float *log_p, *g;                /* backward: saved log p (N,), incoming gradient (N,) */
    float *out_log_p, *dz;                 /* forward log p (N,); dlogp/dz (N, D) or NULL, both passes */
    double *acc;                           /* per thread: usage (M), or S0 (M) | S1 (D*M) | S2 (D*M) */
    int want_acc, moments;                 /* forward: also S1, S2 with g = 1 (acc is S0 | S1 | S2) */
    /* the Monte-Carlo form (mixture_mc_forward): n posteriors, each with `samples` draws */
    const float *post_mu, *post_sigma, *eps; /* (n, D), (n, D), (samples, n, D) */
    float *deps;                            /* mean_t eps * dlogp/dz (n, D), beside dz = mean_t dlogp/dz */
    int64_t samples;
    float shift;                            /* max_m bias_m: the largest peak (set by run_tasks) */
} Task;

/* column k of LANES rows of a (rows, D) array from row `start`; lanes past `rows` repeat the last row */
static inline vf gather(const float *a, int64_t start, int64_t rows, int64_t k, const int64_t d) {
    float tmp[LANES];
    for (int i = 0; i < LANES; ++i) tmp[i] = a[(start + i < rows ? start + i : rows - 1) * d + k];
    vf v;
    memcpy(&v, tmp, sizeof v);
    return v;
}

/* the first `valid` lanes of v into column k of a (rows, D) array from row `start` */
static inline void scatter(vf v, float *a, int64_t start, int valid, int64_t k, const int64_t d) {
    float lanes[LANES];
    memcpy(lanes, &v, sizeof lanes);
    for (int i = 0; i < valid; ++i) a[(start + i) * d + k] = lanes[i];
}

/* the rows of one block as D vectors; lanes past the end repeat the last row */
static inline int load_block(const Task *t, int64_t start, vf *zv) {
    const int64_t d = t->d;
    for (int64_t k = 0; k < d; ++k) zv[k] = gather(t->z, start, t->n, k, d);
    return (int)(t->n - start < LANES ? t->n - start : LANES);
}

static inline vf component(const Task *t, const vf *zv, int64_t j, const int64_t d) {
    vf q = splat(0.0f);
    for (int64_t k = 0; k < d; ++k) {
        vf diff = zv[k] - splat(t->mu_t[k * t->m + j]);
        q += diff * diff * splat(t->iv_t[k * t->m + j]);
    }
    return splat(t->bias[j]) - splat(0.5f) * q;
}

/* The mixture at the LANES rows held in zv: returns log p per lane and leaves the exps
 * exp(comp - top) in qbuf. dir, when given, receives dlogp/dz (D vectors); usage, when given,
 * the sums S0 (and with moments S1, S2) for g = 1 over the first `valid` lanes. */
static inline vf mixture_rows(const Task *t, const vf *zv, int valid, vf *qbuf, vf *dir, vf *usage, const int64_t d) {
    const int64_t m = t->m;
    /* One pass against the call's largest peak (t->shift >= every component's value, so no
     * exp can overflow): each component's exp is made where its quadratic is. A lane whose mass
     * all lies below exp(-60) relative to that peak (a point far from every component, where the
     * exps near the -87 clamp would carry no precision) redoes the block against its own maximum. */
    vf top = splat(t->shift);
    vf total = splat(0.0f);
    if (dir) for (int64_t k = 0; k < d; ++k) dir[k] = splat(0.0f);
    for (int64_t j = 0; j < m; ++j) {
        vf q = splat(0.0f), scaled[d]; /* scaled = (z - mu) / var */
        for (int64_t k = 0; k < d; ++k) {
            vf diff = zv[k] - splat(t->mu_t[k * m + j]);
            scaled[k] = diff * splat(t->iv_t[k * m + j]);
            q += diff * scaled[k];
        }
        vf e = vexp(splat(t->bias[j] - t->shift) - splat(0.5f) * q);
        qbuf[j] = e;
        total += e;
        if (dir)
            for (int64_t k = 0; k < d; ++k) dir[k] += e * scaled[k];
    }
    int32_t low[LANES];
    vi is_low = total < splat(8.7565e-27f); /* exp(-60) */
    int any_low = 0;
    memcpy(low, &is_low, sizeof low);
    for (int i = 0; i < LANES; ++i) any_low |= low[i];
    if (any_low) {
        top = splat(-INFINITY);
        for (int64_t j = 0; j < m; ++j) {
            qbuf[j] = component(t, zv, j, d);
            top = vmax(top, qbuf[j]);
        }
        total = splat(0.0f);
        if (dir) {
            for (int64_t k = 0; k < d; ++k) dir[k] = splat(0.0f);
            for (int64_t j = 0; j < m; ++j) {
                vf e = vexp(qbuf[j] - top);
                qbuf[j] = e;
                total += e;
                for (int64_t k = 0; k < d; ++k)
                    dir[k] += e * (zv[k] - splat(t->mu_t[k * m + j])) * splat(t->iv_t[k * m + j]);
            }
        } else {
            for (int64_t j = 0; j < m; ++j) {
                qbuf[j] = vexp(qbuf[j] - top);
                total += qbuf[j];
            }
        }
    }
    if (dir) { /* dlogp/dz = -sum_m e_m (z - mu_m) / var_m / total */
        vf scale = splat(-1.0f) / total;
        for (int64_t k = 0; k < d; ++k) dir[k] *= scale;
    }
    float tot[LANES], mx[LANES], lp[LANES];
    memcpy(tot, &total, sizeof tot);
    memcpy(mx, &top, sizeof mx);
    for (int i = 0; i < LANES; ++i) lp[i] = mx[i] + logf(tot[i]);
    if (usage) { /* S0 += r; with moments also S1 += r (z - mu), S2 += r (z - mu)^2 (g = 1) */
        float inv[LANES];
        for (int i = 0; i < LANES; ++i) inv[i] = i < valid ? 1.0f / tot[i] : 0.0f;
        vf w;
        memcpy(&w, inv, sizeof w);
        if (!t->moments) {
            for (int64_t j = 0; j < m; ++j) usage[j] += qbuf[j] * w;
        } else {
            for (int64_t j = 0; j < m; ++j) {
                vf r = qbuf[j] * w;
                usage[j] += r;
                for (int64_t k = 0; k < d; ++k) {
                    vf rd = r * (zv[k] - splat(t->mu_t[k * m + j]));
                    usage[m + k * m + j] += rd;
                    usage[m + (d + k) * m + j] += rd * (zv[k] - splat(t->mu_t[k * m + j]));
                }
            }
        }
    }
    vf out;
    memcpy(&out, lp, sizeof out);
    return out;
}

static inline void forward_block(const Task *t, int64_t start, vf *zv, vf *qbuf, vf *usage, const int64_t d) {
    int valid = load_block(t, start, zv);
    vf dir[d];
    scatter(mixture_rows(t, zv, valid, qbuf, t->dz ? dir : NULL, usage, d), t->out_log_p, start, valid, 0, 1);
    if (t->dz)
        for (int64_t k = 0; k < d; ++k) scatter(dir[k], t->dz, start, valid, k, d);
}

static void flush(vf *part, double *acc, size_t width);

/* The Monte-Carlo form: LANES posteriors b (rows of mu, sigma) against their T samples
 * z_tb = mu_b + sigma_b eps_tb, formed here and never stored. Per posterior: the mean over t of
 * log p(z_tb), and (when t->dz) the means over t of dlogp/dz and of eps * dlogp/dz, from which
 * the gradients of mu and sigma follow (z is linear in both). */
static inline void mc_block(const Task *t, int64_t start, vf *zv, vf *qbuf, vf *usage, int64_t *blocks,
                            const int64_t d) {
    const int64_t nb = t->n, nt = t->samples;
    int valid = (int)(nb - start < LANES ? nb - start : LANES);
    vf mu[d], sg[d], ev[d], dir[d], gm[d], ge[d];
    for (int64_t k = 0; k < d; ++k) {
        mu[k] = gather(t->post_mu, start, nb, k, d);
        sg[k] = gather(t->post_sigma, start, nb, k, d);
        gm[k] = ge[k] = splat(0.0f);
    }
    vf acc_lp = splat(0.0f);
    for (int64_t s = 0; s < nt; ++s) {
        const float *eps = t->eps + s * nb * d;
        for (int64_t k = 0; k < d; ++k) {
            ev[k] = gather(eps, start, nb, k, d);
            zv[k] = mu[k] + sg[k] * ev[k];
        }
        acc_lp += mixture_rows(t, zv, valid, qbuf, t->dz ? dir : NULL, usage, d);
        if (t->dz) {
            for (int64_t k = 0; k < d; ++k) {
                gm[k] += dir[k];
                ge[k] += ev[k] * dir[k];
            }
        }
        if (usage && ++*blocks == BLOCK_FLUSH) {
            flush(usage, t->acc, (size_t)(t->moments ? t->m * (1 + 2 * d) : t->m));
            *blocks = 0;
        }
    }
    const vf inv_t = splat(1.0f / (float)nt);
    scatter(acc_lp * inv_t, t->out_log_p, start, valid, 0, 1);
    if (t->dz) {
        for (int64_t k = 0; k < d; ++k) {
            scatter(gm[k] * inv_t, t->dz, start, valid, k, d);
            scatter(ge[k] * inv_t, t->deps, start, valid, k, d);
        }
    }
}

static inline void backward_block(const Task *t, int64_t start, vf *zv, vf *acc, const int64_t d) {
    const int64_t m = t->m;
    int valid = load_block(t, start, zv);
    float gl[LANES], lpl[LANES];
    for (int i = 0; i < LANES; ++i) {
        gl[i] = i < valid ? t->g[start + i] : 0.0f; /* padding lanes carry no gradient */
        lpl[i] = t->log_p[start + (i < valid ? i : valid - 1)];
    }
    vf g, lp;
    memcpy(&g, gl, sizeof g);
    memcpy(&lp, lpl, sizeof lp);
    vf gz[d];
    for (int64_t k = 0; k < d; ++k) gz[k] = splat(0.0f);
    for (int64_t j = 0; j < m; ++j) {
        vf w = g * vexp(component(t, zv, j, d) - lp); /* g r */
        if (acc) acc[j] += w;
        for (int64_t k = 0; k < d; ++k) {
            vf diff = zv[k] - splat(t->mu_t[k * m + j]);
            vf wd = w * diff;
            gz[k] += wd * splat(t->iv_t[k * m + j]);
            if (acc) {
                acc[m + k * m + j] += wd;
                acc[m + (d + k) * m + j] += wd * diff;
            }
        }
    }
    if (t->dz)
        for (int64_t k = 0; k < d; ++k) scatter(-gz[k], t->dz, start, valid, k, d);
}

static void flush(vf *part, double *acc, size_t width) {
    for (size_t j = 0; j < width; ++j) {
        float lanes[LANES];
        memcpy(lanes, &part[j], sizeof lanes);
        double s = 0.0;
        for (int i = 0; i < LANES; ++i) s += lanes[i];
        acc[j] += s;
        part[j] = splat(0.0f);
    }
}

/* Flush-to-zero and denormals-are-zero for the duration of a task (x86): products of a tiny
 * responsibility with a small gradient weight land in the denormal range, where each operation
 * takes a slow path (measured: sharp priors ran 2x slower); contributions of 1e-38 are nothing
 * here. The caller's floating-point mode is restored before the task returns. */
#if defined(__SSE__)
#include <xmmintrin.h>
#define FTZ_BEGIN const unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040u)
#define FTZ_END _mm_setcsr(saved_csr)
#else
#define FTZ_BEGIN
#define FTZ_END
#endif

/* D = 2 (the 2D toys) gets its own instantiation: the compiler unrolls the inner loops */
#define RUN_ROWS(BODY)                                            \
    do {                                                          \
        if (t->d == 2) { const int64_t dd = 2; BODY; }            \
        else { const int64_t dd = t->d; BODY; }                   \
    } while (0)

static void *forward_task(void *arg) {
    FTZ_BEGIN;
    Task *t = (Task *)arg;
    const int64_t m = t->m;
    const size_t width = (size_t)(t->moments ? m * (1 + 2 * t->d) : m);
    vf *zv = aligned_alloc(VALIGN, sizeof(vf) * (size_t)(t->d + 1));
    vf *qbuf = aligned_alloc(VALIGN, sizeof(vf) * (size_t)m);
    vf *usage = t->want_acc ? aligned_alloc(VALIGN, sizeof(vf) * width) : NULL;
    if (usage) for (size_t j = 0; j < width; ++j) usage[j] = splat(0.0f);
    int64_t blocks = 0;
    RUN_ROWS(for (int64_t s = t->lo; s < t->hi; s += LANES) {
        if (t->samples) { /* the Monte-Carlo form: a block of posteriors, counting its samples' blocks */
            mc_block(t, s, zv, qbuf, usage, &blocks, dd);
            continue;
        }
        forward_block(t, s, zv, qbuf, usage, dd);
        if (usage && ++blocks == BLOCK_FLUSH) { flush(usage, t->acc, width); blocks = 0; }
    });
    if (usage) { flush(usage, t->acc, width); free(usage); }
    free(qbuf);
    free(zv);
    FTZ_END;
    return NULL;
}

static void *backward_task(void *arg) {
    FTZ_BEGIN;
    Task *t = (Task *)arg;
    const size_t width = (size_t)(t->m * (1 + 2 * t->d));
    vf *zv = aligned_alloc(VALIGN, sizeof(vf) * (size_t)(t->d + 1));
    vf *part = t->want_acc ? aligned_alloc(VALIGN, sizeof(vf) * width) : NULL;
    if (part) for (size_t j = 0; j < width; ++j) part[j] = splat(0.0f);
    int64_t blocks = 0;
    RUN_ROWS(for (int64_t s = t->lo; s < t->hi; s += LANES) {
        backward_block(t, s, zv, part, dd);
        if (part && ++blocks == BLOCK_FLUSH) { flush(part, t->acc, width); blocks = 0; }
    });
    if (part) { flush(part, t->acc, width); free(part); }
    free(zv);
    FTZ_END;
    return NULL;
}

/* Rows are split into one contiguous range per thread, run by OpenMP. Linked against the
 * libgomp.so.1 that PyTorch has already loaded, the kernel shares PyTorch's thread pool: no thread
 * start-up per call, and no second pool competing with PyTorch's spinning workers. */
static void run_tasks(void *(*fn)(void *), const Task *base, int threads, double *acc_out, size_t width) {
    const int64_t blocks = (base->n + LANES - 1) / LANES;
    float shift = -INFINITY;
    for (int64_t j = 0; j < base->m; ++j) shift = base->bias[j] > shift ? base->bias[j] : shift;
    if (threads < 1) threads = 1;
    if (base->n * (base->samples > 0 ? base->samples : 1) < 4096) threads = 1; /* under 4,096 rows a thread costs more than it saves */
    double *accs = acc_out ? calloc(width * (size_t)threads, sizeof(double)) : NULL;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int i = 0; i < threads; ++i) {
        Task task = *base;
        task.shift = shift;
        task.lo = LANES * (blocks * i / threads);
        task.hi = LANES * (blocks * (i + 1) / threads);
        task.acc = accs ? accs + width * (size_t)i : NULL;
        task.want_acc = acc_out != NULL;
        fn(&task);
    }
    if (accs) {
        for (int i = 0; i < threads; ++i)
            for (size_t j = 0; j < width; ++j) acc_out[j] += accs[width * (size_t)i + j];
        free(accs);
    }
}

/* log p (N,); when sums != NULL, sum_n r_nm (M,) added in double, or with moments != 0 the sums
 * S0 | S1 | S2 of the backward for g = 1 ((1 + 2D) * M): where the incoming gradient turns out
 * uniform (a mean over the samples) they are the parameters' gradient up to that one factor, and
 * the backward needs no second pass of exps. When dlogp_dz != NULL, the gradient of each row's own
 * log p with respect to its z (N, D): the backward of a call that needs only dz is one product. */
void mixture_forward(int64_t n, int64_t m, int64_t d, const float *z, const float *mu_t, const float *iv_t,
                     const float *bias, float *log_p, double *sums, int moments, float *dlogp_dz, int threads) {
    if (n <= 0) return;
    Task base = {0, 0, m, d, n, z, mu_t, iv_t, bias, NULL, NULL, log_p, dlogp_dz, NULL, 0, moments != 0,
                 NULL, NULL, NULL, NULL, 0};
    run_tasks(forward_task, &base, threads, sums, (size_t)(moments ? m * (1 + 2 * d) : m));
}

/* dz (N, D) when dz != NULL; S0 | S1 | S2 ((1 + 2D) * M doubles) added when stats != NULL */
void mixture_backward(int64_t n, int64_t m, int64_t d, const float *z, const float *mu_t, const float *iv_t,
                      const float *bias, const float *log_p, const float *g, float *dz, double *stats, int threads) {
    if (n <= 0) return;
    Task base = {0, 0, m, d, n, z, mu_t, iv_t, bias, log_p, g, NULL, dz, NULL, 0, 0, NULL, NULL, NULL, NULL, 0};
    run_tasks(backward_task, &base, threads, stats, (size_t)(m * (1 + 2 * d)));
}

/* The Monte-Carlo KL's log p term without its (samples, n, D) samples in memory: for n posteriors
 * (mu, sigma: (n, D)) and eps (samples, n, D), z_tb = mu_b + sigma_b eps_tb.
 * mean_log_p (n,) = mean_t log p(z_tb); when dmu != NULL also dmu = mean_t dlogp/dz and
 * deps = mean_t eps_tb * dlogp/dz (n, D); sums as in mixture_forward, over all samples * n rows. */
void mixture_mc_forward(int64_t n, int64_t samples, int64_t m, int64_t d, const float *mu, const float *sigma,
                        const float *eps, const float *mu_t, const float *iv_t, const float *bias, float *mean_log_p,
                        double *sums, int moments, float *dmu, float *deps, int threads) {
    if (n <= 0 || samples <= 0) return;
    Task base = {0, 0, m, d, n, NULL, mu_t, iv_t, bias, NULL, NULL, mean_log_p, dmu, NULL, 0, moments != 0,
                 mu, sigma, eps, deps, samples};
    run_tasks(forward_task, &base, threads, sums, (size_t)(moments ? m * (1 + 2 * d) : m));
}
