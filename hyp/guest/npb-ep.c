/* npb-ep: the NPB EP kernel's memory behaviour (the `npb-ep` workload), by running
 * the kernel itself for ever: each iteration fills a batch buffer of 16 pages of the
 * vCPU's share with fresh uniform deviates of the NPB generator (vranlc), turns them
 * into Gaussian pairs and updates the accumulators (ten annulus counts, sx, sy) in
 * the page after the buffer. Compute-heavy; nothing else moves.
 * arg1: ring the doorbell every arg1 iterations (0 means every iteration). */
#include "guest.h"
#include "ep.h"

#define BATCH_PAGES 16

void guest_main(uint64_t cpu)
{
	uint64_t pages = cpu_pages();
	uint64_t batch = BATCH_PAGES < pages / 2 ? BATCH_PAGES : pages / 2;
	uint64_t nk = batch * PAGE_SIZE / 16;
	double *x = (double *)cpu_page(cpu, 0);
	struct ep_sums *sums = (struct ep_sums *)cpu_page(cpu, batch);
	uint64_t every = PARAMS->arg1 ? PARAMS->arg1 : 1;
	uint64_t n = STATUS->iterations[cpu];
	/* Each vCPU draws its own stream: the seed advanced by 2^40 cpu deviates. */
	double seed = ep_skip(EP_SEED, ep_power2(EP_A, 40), cpu);

	if (cpu == 0)
		puts("npb-ep: start\n");
	for (;;) {
		n++;
		vranlc(2 * nk, &seed, EP_A, x);
		ep_pairs(x, nk, sums);
		STATUS->iterations[cpu] = n;
		if (n % every == 0)
			outl(PORT_DOORBELL, (uint32_t)n);
	}
}
