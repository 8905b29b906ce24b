/* web: scattered small writes, like a web server's heap and buffers. Each iteration
 * writes arg0 records of 64 to 256 bytes at random places in the vCPU's share.
 * arg1: ring the doorbell every arg1 iterations (0 means every iteration). */
#include "guest.h"

void guest_main(uint64_t cpu)
{
	uint64_t pages = cpu_pages();
	uint64_t writes = PARAMS->arg0 ? PARAMS->arg0 : 64;
	uint64_t every = PARAMS->arg1 ? PARAMS->arg1 : 1;
	uint64_t rng = (PARAMS->seed ^ (cpu << 48)) | 1;
	uint64_t n = STATUS->iterations[cpu];

	if (cpu == 0)
		puts("web: start\n");
	for (;;) {
		n++;
		for (uint64_t i = 0; i < writes; i++) {
			uint64_t r = rng_next(&rng);
			uint64_t *p = cpu_page(cpu, r % pages);
			uint64_t words = 8 * (1 + ((r >> 40) & 3));
			uint64_t first = (r >> 48) % (512 - words);
			for (uint64_t w = 0; w < words; w++)
				p[first + w] = (n << 32) ^ (i << 12) ^ w;
		}
		STATUS->iterations[cpu] = n;
		if (n % every == 0)
			outl(PORT_DOORBELL, (uint32_t)n);
	}
}
