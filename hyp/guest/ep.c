/* ep: the NPB EP kernel, class S (M = 24: 2^24 pairs in 256 batches of 2^16),
 * verified against the specification's sums. With n vCPUs, vCPU c runs batches
 * c, c + n, c + 2n, ... Each batch k starts the generator at seed * a^(2^17 k),
 * fills 1 MiB of the vCPU's share of the data area with 2^17 uniform deviates
 * (vranlc), and accumulates the Gaussian pairs it yields; the doorbell rings with
 * the vCPU's batches done. A vCPU that is done publishes its sums in the page after
 * its deviates; vCPU 0 waits for all of them, adds them in vCPU order, prints the
 * pair counts and the bit patterns of sx and sy, "verified" if both are within a
 * relative 1e-8 of the reference values, and finishes with code 0 (1 if not
 * verified). The VMM gives every vCPU at least 257 data pages. */
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

/* A vCPU's published sums: `done` is set after them. */
struct ep_result {
	struct ep_sums sums;
	uint64_t done;
};

/* Page 2 NK * 8 / 4096 = 256 of vCPU `cpu`'s share, after its deviates. */
static volatile struct ep_result *result_of(uint64_t cpu)
{
	return (volatile struct ep_result *)cpu_page(cpu, 2 * NK * sizeof(double) / PAGE_SIZE);
}

void guest_main(uint64_t cpu)
{
	uint64_t n = vcpus();
	double *x = (double *)cpu_page(cpu, 0);
	double an = ep_power2(EP_A, MK + 1);
	struct ep_sums sums = {{0}, 0, 0};
	uint64_t done = 0;

	if (cpu == 0)
		puts("ep: class S\n");
	for (uint64_t k = cpu; k < NN; k += n) {
		double seed = ep_skip(EP_SEED, an, k);
		vranlc(2 * NK, &seed, EP_A, x);
		ep_pairs(x, NK, &sums);
		done++;
		STATUS->iterations[cpu] = done;
		outl(PORT_DOORBELL, (uint32_t)done);
	}
	volatile struct ep_result *mine = result_of(cpu);
	for (int l = 0; l < 10; l++)
		mine->sums.q[l] = sums.q[l];
	mine->sums.sx = sums.sx;
	mine->sums.sy = sums.sy;
	/* x86 keeps stores in order: the sums are visible before `done`. */
	mine->done = 1;
	if (cpu != 0)
		idle_forever();
	struct ep_sums total = {{0}, 0, 0};
	for (uint64_t c = 0; c < n; c++) {
		volatile struct ep_result *r = result_of(c);
		while (!r->done)
			__asm__ volatile("pause");
		for (int l = 0; l < 10; l++)
			total.q[l] += r->sums.q[l];
		total.sx += r->sums.sx;
		total.sy += r->sums.sy;
	}
	sums = total;
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
