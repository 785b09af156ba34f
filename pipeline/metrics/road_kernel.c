/* ROAD's linear imputation for one image on the CPU: the algorithm of pipeline/metrics/road.py's
 * torch solver (multigrid-preconditioned conjugate gradients, the same V-cycle, transfers and
 * stopping rule), one plane at a time so that a plane's working set stays in the core's cache
 * instead of every step streaming all planes of a batch through memory. Loaded by
 * pipeline/native.py (compiled on first use with the machine's C compiler); road.py falls back
 * to its torch solver where there is none.
 *
 * Arrays are stored with a zero halo of HALO pixels on each side, so the 3 x 3 stencil and the
 * 4 x 4 transfers need no bounds checks; only the interior is ever written. Sums of products
 * (the CG's inner products) accumulate in double. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HALO 2
#define MAX_LEVELS 32

typedef struct {
    int h, w, stride;
    float *m;    /* 1 where the pixel is removed (an unknown), else 0 */
    float *s;    /* the sum of the in-image neighbours' weights */
    float *inv;  /* m / s */
    float *rhs;  /* the right-hand side of this level's correction */
    float *e;    /* this level's correction */
    float *t;    /* scratch: the other Jacobi buffer, the residual */
} Level;

static float *at(float *a, const Level *L, int i) { return a + (size_t)(i + HALO) * L->stride + HALO; }

static size_t cells(int h, int w) { return (size_t)(h + 2 * HALO) * (w + 2 * HALO); }

/* out = the weighted sum of each pixel's 8 neighbours (1/6 direct, 1/12 diagonal). */
static inline float stencil(const float *up, const float *mid, const float *dn, int j) {
    return (2.0f * (up[j] + dn[j] + mid[j - 1] + mid[j + 1]) + (up[j - 1] + up[j + 1] + dn[j - 1] + dn[j + 1]))
           * (1.0f / 12.0f);
}

/* One Jacobi sweep for A e = r: out = inv * (r + W(in)) (0 off the removed pixels). in == NULL:
 * from e = 0, out = inv * r. */
static void jacobi(const Level *L, float *in, const float *r_, float *out) {
    for (int i = 0; i < L->h; i++) {
        const float *inv = at(L->inv, L, i), *r = r_ + (size_t)(i + HALO) * L->stride + HALO;
        float *o = at(out, L, i);
        if (!in) {
            for (int j = 0; j < L->w; j++) o[j] = inv[j] * r[j];
            continue;
        }
        const float *up = at(in, L, i - 1), *mid = at(in, L, i), *dn = at(in, L, i + 1);
        for (int j = 0; j < L->w; j++) o[j] = inv[j] * (r[j] + stencil(up, mid, dn, j));
    }
}

/* out = r - A e = r + m * (W(e) - s * e). */
static void residual(const Level *L, const float *r_, float *e, float *out) {
    for (int i = 0; i < L->h; i++) {
        const float *up = at(e, L, i - 1), *mid = at(e, L, i), *dn = at(e, L, i + 1);
        const float *m = at(L->m, L, i), *s = at(L->s, L, i), *r = r_ + (size_t)(i + HALO) * L->stride + HALO;
        float *o = at(out, L, i);
        for (int j = 0; j < L->w; j++) o[j] = r[j] + m[j] * (stencil(up, mid, dn, j) - s[j] * mid[j]);
    }
}

/* Full weighting, (1, 3, 3, 1) / 4 along each axis centred between fine pixels 2I and 2I + 1, zero
 * outside the fine grid, then masked by the coarse grid's removed pixels: fine -> C->rhs. Rows first
 * (into `row`, a scratch of at least the fine stride), then columns. */
static void restrict_to(const Level *F, float *fine, const Level *C, float *row) {
    float *tmp = row + HALO;
    for (int I = 0; I < C->h; I++) {
        const float *a = at(fine, F, 2 * I - 1), *b = at(fine, F, 2 * I), *c = at(fine, F, 2 * I + 1),
                    *d = at(fine, F, 2 * I + 2);
        for (int x = -1; x <= 2 * C->w; x++) tmp[x] = 0.25f * (a[x] + d[x]) + 0.75f * (b[x] + c[x]);
        const float *mc = at(C->m, C, I);
        float *o = at(C->rhs, C, I);
        for (int J = 0; J < C->w; J++)
            o[J] = mc[J] * (0.25f * (tmp[2 * J - 1] + tmp[2 * J + 2]) + 0.75f * (tmp[2 * J] + tmp[2 * J + 1]));
    }
}

/* e += m * P(coarse), P bilinear (the transpose of restrict_to): fine 2k takes 3/4 of coarse k and
 * 1/4 of k - 1, fine 2k + 1 takes 3/4 of k and 1/4 of k + 1, along each axis. Columns first (into
 * `row`), then rows. */
static void prolong_add(const Level *C, float *coarse, const Level *F, float *e, float *row) {
    float *v = row + HALO;
    for (int y = 0; y < F->h; y++) {
        int k = y / 2, k2 = (y % 2) ? k + 1 : k - 1;
        const float *c1 = at(coarse, C, k), *c2 = at(coarse, C, k2);
        for (int l = -1; l <= C->w; l++) v[l] = 0.75f * c1[l] + 0.25f * c2[l];
        const float *m = at(F->m, F, y);
        float *o = at(e, F, y);
        const int pairs = F->w / 2;
        for (int l = 0; l < pairs; l++) {
            o[2 * l] += m[2 * l] * (0.75f * v[l] + 0.25f * v[l - 1]);
            o[2 * l + 1] += m[2 * l + 1] * (0.75f * v[l] + 0.25f * v[l + 1]);
        }
        if (F->w % 2) o[F->w - 1] += m[F->w - 1] * (0.75f * v[pairs] + 0.25f * v[pairs - 1]);
    }
}

static float *swap_out(Level *L, float *e) {  /* the Jacobi buffer that is not e */
    return e == L->e ? L->t : L->e;
}

/* One symmetric V-cycle for A e = rhs at level d; returns the buffer holding e (L->e or L->t).
 * sweeps Jacobi sweeps before and after the coarse correction, coarse_sweeps on the coarsest. */
static float *vcycle(Level *levels, int d, int n, float *rhs, int sweeps, int coarse_sweeps, float *row) {
    Level *L = &levels[d];
    float *e = L->e;
    jacobi(L, NULL, rhs, e);
    if (d == n - 1) {
        for (int k = 1; k < coarse_sweeps; k++) {
            float *o = swap_out(L, e);
            jacobi(L, e, rhs, o);
            e = o;
        }
        return e;
    }
    for (int k = 1; k < sweeps; k++) {
        float *o = swap_out(L, e);
        jacobi(L, e, rhs, o);
        e = o;
    }
    float *res = swap_out(L, e);
    residual(L, rhs, e, res);
    restrict_to(L, res, &levels[d + 1], row);
    float *coarse = vcycle(levels, d + 1, n, levels[d + 1].rhs, sweeps, coarse_sweeps, row);
    prolong_add(&levels[d + 1], coarse, L, e, row);
    for (int k = 0; k < sweeps; k++) {
        float *o = swap_out(L, e);
        jacobi(L, e, rhs, o);
        e = o;
    }
    return e;
}

static double dot(const Level *L, float *a, float *b) {
    double sum = 0.0;
    for (int i = 0; i < L->h; i++) {
        const float *x = at(a, L, i), *y = at(b, L, i);
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < L->w; j++) sum += (double)x[j] * (double)y[j];
    }
    return sum;
}

/* The imputed values z [channels, h, w] (0 off the removed pixels) of planes v [channels, h, w]
 * whose removed pixels are removed [h, w] (1 = removed), each channel solved to a residual below
 * tol times its right-hand side's (at most max_iter iterations). Returns the most iterations a
 * channel took, or -1 when memory ran out. */
int road_impute(const float *v, const uint8_t *removed, float *z_out, int channels, int h, int w, float tol,
                int max_iter, int sweeps, int coarse_sweeps, int coarsest) {
    Level levels[MAX_LEVELS];
    int n = 0;
    size_t total = 0;
    for (int lh = h, lw = w;; lh = (lh + 1) / 2, lw = (lw + 1) / 2) {
        levels[n].h = lh, levels[n].w = lw, levels[n].stride = lw + 2 * HALO;
        total += 6 * cells(lh, lw);
        n++;
        if ((lh < lw ? lh : lw) < 2 * coarsest || n == MAX_LEVELS) break;
    }
    const size_t fine = cells(h, w);
    total += 5 * fine + w + 2 * HALO + 2; /* z, r, p, ap, known; the CG's y lives in levels[0]; a row */
    float *pool = calloc(total, sizeof(float));
    if (!pool) return -1;
    float *next = pool;
    for (int d = 0; d < n; d++) {
        size_t c = cells(levels[d].h, levels[d].w);
        levels[d].m = next, next += c;
        levels[d].s = next, next += c;
        levels[d].inv = next, next += c;
        levels[d].rhs = next, next += c;
        levels[d].e = next, next += c;
        levels[d].t = next, next += c;
    }
    float *z = next, *r = next + fine, *p = next + 2 * fine, *ap = next + 3 * fine, *known = next + 4 * fine;
    float *row = next + 5 * fine;
    Level *L0 = &levels[0];

    /* removed masks per level: a coarse pixel is removed when its 2 x 2 fine pixels all are (pixels
     * past an odd side count as removed); s from the in-image neighbours; inv = m / s */
    for (int d = 0; d < n; d++) {
        Level *L = &levels[d];
        for (int i = 0; i < L->h; i++) {
            float *m = at(L->m, L, i);
            for (int j = 0; j < L->w; j++) {
                if (d == 0) {
                    m[j] = removed[(size_t)i * w + j] ? 1.0f : 0.0f;
                    continue;
                }
                const Level *F = &levels[d - 1];
                int all = 1;
                for (int a = 0; a < 2; a++)
                    for (int c = 0; c < 2; c++) {
                        int fi = 2 * i + a, fj = 2 * j + c;
                        if (fi < F->h && fj < F->w && at(F->m, F, fi)[fj] == 0.0f) all = 0;
                    }
                m[j] = (float)all;
            }
        }
        for (int i = 0; i < L->h; i++) {
            float *s = at(L->s, L, i), *inv = at(L->inv, L, i), *m = at(L->m, L, i);
            for (int j = 0; j < L->w; j++) {
                float sum = 0.0f;
                for (int di = -1; di <= 1; di++)
                    for (int dj = -1; dj <= 1; dj++) {
                        int a = i + di, c = j + dj;
                        if ((di || dj) && a >= 0 && a < L->h && c >= 0 && c < L->w)
                            sum += (di && dj) ? 1.0f / 12.0f : 2.0f / 12.0f;
                    }
                s[j] = sum;
                inv[j] = m[j] / sum;
            }
        }
    }

    int most = 0;
    for (int ch = 0; ch < channels; ch++) {
        const float *plane = v + (size_t)ch * h * w;
        for (int i = 0; i < h; i++) {
            const float *m = at(L0->m, L0, i);
            float *k = at(known, L0, i), *zi = at(z, L0, i);
            for (int j = 0; j < w; j++) k[j] = (1.0f - m[j]) * plane[(size_t)i * w + j], zi[j] = 0.0f;
        }
        for (int i = 0; i < h; i++) { /* r = b = m * W(known), the right-hand side */
            const float *up = at(known, L0, i - 1), *mid = at(known, L0, i), *dn = at(known, L0, i + 1);
            const float *m = at(L0->m, L0, i);
            float *ri = at(r, L0, i);
            for (int j = 0; j < w; j++) ri[j] = m[j] * stencil(up, mid, dn, j);
        }
        double rr = dot(L0, r, r);
        const double limit = (double)tol * tol * rr;  /* r is b here */
        float *y = vcycle(levels, 0, n, r, sweeps, coarse_sweeps, row);
        for (int i = 0; i < h; i++) memcpy(at(p, L0, i), at(y, L0, i), (size_t)w * sizeof(float));
        double ry = dot(L0, r, y);
        int it = 0;
        for (; it < max_iter && rr > limit; it++) {
            double pap = 0.0;
            for (int i = 0; i < h; i++) { /* ap = A p = m * (s * p - W(p)) */
                const float *up = at(p, L0, i - 1), *mid = at(p, L0, i), *dn = at(p, L0, i + 1);
                const float *m = at(L0->m, L0, i), *s = at(L0->s, L0, i);
                float *o = at(ap, L0, i);
#pragma omp simd reduction(+ : pap)
                for (int j = 0; j < w; j++) {
                    o[j] = m[j] * (s[j] * mid[j] - stencil(up, mid, dn, j));
                    pap += (double)mid[j] * (double)o[j];
                }
            }
            const float alpha = pap > 0 ? (float)(ry / (pap > 1e-30 ? pap : 1e-30)) : 0.0f;
            rr = 0.0;
            for (int i = 0; i < h; i++) {
                float *zi = at(z, L0, i), *ri = at(r, L0, i);
                const float *pi = at(p, L0, i), *api = at(ap, L0, i);
#pragma omp simd reduction(+ : rr)
                for (int j = 0; j < w; j++) {
                    zi[j] += alpha * pi[j];
                    ri[j] -= alpha * api[j];
                    rr += (double)ri[j] * (double)ri[j];
                }
            }
            y = vcycle(levels, 0, n, r, sweeps, coarse_sweeps, row);
            const double ry_new = dot(L0, r, y);
            const float beta = ry > 0 ? (float)(ry_new / (ry > 1e-30 ? ry : 1e-30)) : 0.0f;
            for (int i = 0; i < h; i++) {
                float *pi = at(p, L0, i);
                const float *yi = at(y, L0, i);
                for (int j = 0; j < w; j++) pi[j] = yi[j] + beta * pi[j];
            }
            ry = ry_new;
        }
        if (it > most) most = it;
        float *out = z_out + (size_t)ch * h * w;
        for (int i = 0; i < h; i++) memcpy(out + (size_t)i * w, at(z, L0, i), (size_t)w * sizeof(float));
    }
    free(pool);
    return most;
}
