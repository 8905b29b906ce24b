/* ep: the NPB EP kernel, class S (M = 24: 2^24 pairs in 256 batches of 2^16), on
 * vCPU 0, verified against the specification's sums. Each batch k starts the
 * generator at seed * a^(2^17 k), fills 1 MiB of the data area with 2^17 uniform
 * deviates (vranlc), and accumulates the Gaussian pairs it yields; the doorbell
 * rings with the batches done. At the end the guest prints the pair counts and the
 * bit patterns of sx and sy, "verified" if both are within a relative 1e-8 of the
 * reference values, and finishes with code 0 (1 if not verified). */
#include "guest.h"
#include "ep.h"

#define M 24
#define MK 16
#define NK (1ull << MK)
#define NN (1ull << (M - MK))

/* The specification's verification sums for class S. */
#define SX_REF -3.247834652034740e+3
#define SY_REF -6.958407078382297e+3
#define EPSILON 1.0e-8

static int close_to(double value, double reference)
{
	return __builtin_fabs((value - reference) / reference) <= EPSILON;
}

void guest_main(uint64_t cpu)
{
	if (cpu != 0)
		idle_forever();
	double *x = (double *)data_page(0);
	double an = ep_power2(EP_A, MK + 1);
	struct ep_sums sums = {{0}, 0, 0};

	puts("ep: class S\n");
	for (uint64_t k = 0; k < NN; k++) {
		double seed = ep_skip(EP_SEED, an, k);
		vranlc(2 * NK, &seed, EP_A, x);
		ep_pairs(x, NK, &sums);
		STATUS->iterations[0] = k + 1;
		outl(PORT_DOORBELL, (uint32_t)(k + 1));
	}
	double pairs = 0;
	puts("ep: q");
	for (int l = 0; l < 10; l++) {
		pairs += sums.q[l];
		puts(l ? "," : "=");
		put_dec((uint64_t)sums.q[l]);
	}
	puts(" pairs=");
	put_dec((uint64_t)pairs);
	union {
		double d;
		uint64_t u;
	} sx = {.d = sums.sx}, sy = {.d = sums.sy};
	puts(" sx=");
	put_hex(sx.u);
	puts(" sy=");
	put_hex(sy.u);
	int verified = close_to(sums.sx, SX_REF) && close_to(sums.sy, SY_REF);
	puts(verified ? " verified\n" : " NOT verified\n");
	finish(verified ? 0 : 1);
}
