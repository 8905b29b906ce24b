/* dense: dense rewrites of a hot set, like a numerical kernel's arrays. Each
 * iteration rewrites every word of the first arg0 pages of the vCPU's share.
 * arg1: ring the doorbell every arg1 iterations (0 means every iteration). */
#include "guest.h"

void guest_main(uint64_t cpu)
{
	uint64_t pages = cpu_pages();
	uint64_t hot = PARAMS->arg0 && PARAMS->arg0 < pages ? PARAMS->arg0 : pages;
	uint64_t every = PARAMS->arg1 ? PARAMS->arg1 : 1;
	uint64_t n = STATUS->iterations[cpu];
	uint64_t *p = cpu_page(cpu, 0);

	if (cpu == 0)
		puts("dense: start\n");
	for (;;) {
		n++;
		for (uint64_t w = 0; w < hot * 512; w++)
			p[w] = (n * 0x9E3779B97F4A7C15ull) + w;
		STATUS->iterations[cpu] = n;
		if (n % every == 0)
			outl(PORT_DOORBELL, (uint32_t)n);
	}
}
