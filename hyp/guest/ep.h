/* The NAS Parallel Benchmarks' EP (Embarrassingly Parallel) kernel, from the NPB
 * specification (NAS report RNR-94-007 and NPB 2 report NAS-95-020): pseudorandom
 * numbers from the linear congruential generator x' = a x mod 2^46, a = 5^13,
 * computed exactly in double precision by splitting operands into 23-bit halves;
 * pairs of them turned into Gaussian deviates by the Marsaglia polar method; the
 * deviates counted into ten square annuli and summed. Shared by ep.c (the kernel,
 * verified) and npb-ep.c (its memory behaviour, forever). Needs SSE2 (the VMM sets
 * CR4.OSFXSR; x86-64 code uses SSE for doubles). */
#ifndef FGBI_EP_H
#define FGBI_EP_H

#include <stdint.h>

/* The multiplier 5^13 and the seed 271828183 of the specification. */
#define EP_A 1220703125.0
#define EP_SEED 271828183.0

#define R23 (1.0 / 8388608.0) /* 2^-23 */
#define T23 8388608.0         /* 2^23 */
#define R46 (R23 * R23)
#define T46 (T23 * T23)

/* The 23-bit halves of a multiplier a = 2^23 a1 + a2 (0 < a < 2^46). */
struct ep_mult {
	double a1, a2;
};

static inline struct ep_mult ep_mult(double a)
{
	double a1 = (double)(int64_t)(R23 * a);
	return (struct ep_mult){a1, a - T23 * a1};
}

/* a x mod 2^46 for 0 < x < 2^46, exactly in double precision: with x = 2^23 x1 + x2,
 * a x mod 2^46 = 2^23 ((a1 x2 + a2 x1) mod 2^23) + a2 x2, reduced mod 2^46; no
 * intermediate exceeds 2^52, so every operation is exact. */
static inline double ep_step(double x, struct ep_mult a)
{
	double x1 = (double)(int64_t)(R23 * x), x2 = x - T23 * x1;
	double t1 = a.a1 * x2 + a.a2 * x1;
	double t2 = (double)(int64_t)(R23 * t1);
	double z = t1 - T23 * t2;
	double t3 = T23 * z + a.a2 * x2;
	double t4 = (double)(int64_t)(R46 * t3);
	return t3 - T46 * t4;
}

/* The specification's randlc: x = a x mod 2^46; returns x 2^-46, a uniform deviate
 * in (0, 1). */
static inline double randlc(double *x, double a)
{
	*x = ep_step(*x, ep_mult(a));
	return R46 * *x;
}

/* The specification's vranlc: the next n deviates of the generator into y[0..n],
 * advancing x by n steps. The steps form one dependent chain, so this computes four
 * interleaved chains with the multiplier a^4 (y[i + 4] from y[i]'s state): the same
 * exact values, four times the instruction-level parallelism. */
static inline void vranlc(uint64_t n, double *x, double a, double *y)
{
	struct ep_mult m = ep_mult(a);
	double v = *x;
	uint64_t quads = n >= 8 ? n / 4 : 0;
	if (quads) {
		double a4 = a;
		randlc(&a4, a4);
		randlc(&a4, a4);
		struct ep_mult m4 = ep_mult(a4);
		double c0 = ep_step(v, m), c1 = ep_step(c0, m), c2 = ep_step(c1, m),
		       c3 = ep_step(c2, m);
		for (uint64_t q = 0; q < quads; q++) {
			y[4 * q] = R46 * c0;
			y[4 * q + 1] = R46 * c1;
			y[4 * q + 2] = R46 * c2;
			y[4 * q + 3] = R46 * c3;
			v = c3;
			c0 = ep_step(c0, m4);
			c1 = ep_step(c1, m4);
			c2 = ep_step(c2, m4);
			c3 = ep_step(c3, m4);
		}
	}
	for (uint64_t i = 4 * quads; i < n; i++) {
		v = ep_step(v, m);
		y[i] = R46 * v;
	}
	*x = v;
}

/* The natural logarithm of a positive, finite, normal x, to within a few units in
 * the last place: x = m 2^e with m in [sqrt(1/2), sqrt(2)), and
 * ln m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...) with s = (m - 1) / (m + 1),
 * |s| < 0.172, so twelve terms reach double precision. */
static inline double ep_log(double x)
{
	union {
		double d;
		uint64_t u;
	} v = {.d = x};
	int64_t e = (int64_t)((v.u >> 52) & 0x7ff) - 1023;
	v.u = (v.u & 0x000fffffffffffffull) | 0x3ff0000000000000ull;
	double m = v.d;
	if (m > 1.4142135623730951) {
		m *= 0.5;
		e++;
	}
	double s = (m - 1.0) / (m + 1.0), s2 = s * s;
	double sum = 1.0 / 23;
	for (int k = 10; k >= 0; k--)
		sum = sum * s2 + 1.0 / (2 * k + 1);
	/* ln 2 split so that e * LN2_HI is exact. */
	const double LN2_HI = 6.93147180369123816490e-01, LN2_LO = 1.90821492927058770002e-10;
	return (double)e * LN2_HI + (2.0 * s * sum + (double)e * LN2_LO);
}

/* The kernel's accumulators. */
struct ep_sums {
	double q[10]; /* pairs whose larger |deviate| falls in [l, l + 1) */
	double sx, sy;
};

/* Gaussian pairs from the nk uniform pairs in x[0..2 nk] (Marsaglia polar method),
 * counted and summed into `sums`. */
static inline void ep_pairs(const double *x, uint64_t nk, struct ep_sums *sums)
{
	for (uint64_t i = 0; i < nk; i++) {
		double x1 = 2.0 * x[2 * i] - 1.0;
		double x2 = 2.0 * x[2 * i + 1] - 1.0;
		double t1 = x1 * x1 + x2 * x2;
		if (t1 <= 1.0) {
			double t2 = __builtin_sqrt(-2.0 * ep_log(t1) / t1);
			double t3 = x1 * t2, t4 = x2 * t2;
			double l = __builtin_fabs(t3) > __builtin_fabs(t4) ? __builtin_fabs(t3)
									     : __builtin_fabs(t4);
			if (l < 10.0)
				sums->q[(int)l] += 1.0;
			sums->sx += t3;
			sums->sy += t4;
		}
	}
}

/* a^(2^k) mod 2^46, by squaring. */
static inline double ep_power2(double a, int k)
{
	double t = a;
	for (int i = 0; i < k; i++)
		randlc(&t, t);
	return t;
}

/* The generator's state j multiplications by a after x: x a^j mod 2^46, by binary
 * powering. */
static inline double ep_skip(double x, double a, uint64_t j)
{
	for (;;) {
		if (j & 1)
			randlc(&x, a);
		j >>= 1;
		if (!j)
			return x;
		randlc(&a, a);
	}
}

#endif
