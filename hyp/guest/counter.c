/* counter: a counter kept both in a register and in memory, and a memory pattern,
 * per vCPU in its own share of the data area. Iteration n rewrites page
 * (n - 1) % pages of the share with pattern(cpu, n, word), after checking that the
 * page still holds what iteration n - pages wrote. Any gap or bad byte after a
 * restore makes the guest report a fault.
 * arg0: ring the doorbell every arg0 iterations (0 means every iteration). */
#include "guest.h"

static inline uint64_t pattern(uint64_t cpu, uint64_t n, uint64_t word)
{
	word ^= cpu << 32;
	return (n * 0x9E3779B97F4A7C15ull) ^ (word * 0xD6E8FEB86659FD93ull) ^ word;
}

void guest_main(uint64_t cpu)
{
	uint64_t pages = cpu_pages();
	uint64_t every = PARAMS->arg0 ? PARAMS->arg0 : 1;
	uint64_t n = STATUS->iterations[cpu];

	if (cpu == 0)
		puts("counter: start\n");
	for (;;) {
		n++;
		uint64_t *p = cpu_page(cpu, (n - 1) % pages);
		if (n > pages) {
			uint64_t before = n - pages;
			for (uint64_t w = 0; w < 512; w++)
				if (p[w] != pattern(cpu, before, w))
					fault(FAULT_PATTERN);
		}
		for (uint64_t w = 0; w < 512; w++)
			p[w] = pattern(cpu, n, w);
		if (STATUS->iterations[cpu] != n - 1)
			fault(FAULT_COUNTER);
		STATUS->iterations[cpu] = n;
		if (n % every == 0)
			outl(PORT_DOORBELL, (uint32_t)n);
	}
}
