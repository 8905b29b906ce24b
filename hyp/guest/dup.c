/* dup: sharing's best case (the `dup` workload). The vCPU's share is 2% source
 * pages and 98% copy targets. Each iteration produces up to 8 fresh source pages
 * (alternately random and text), then copies them whole into 200 target pages and
 * in 64-, 128- or 256-byte aligned pieces into 300 places (message fan-out, buffer
 * duplication, copied templates).
 * arg1: ring the doorbell every arg1 iterations (0 means every iteration). */
#include "guest.h"

void guest_main(uint64_t cpu)
{
	uint64_t pages = cpu_pages();
	uint64_t sources = pages / 50 ? pages / 50 : 1;
	uint64_t targets = pages - sources;
	uint64_t fresh = sources < 8 ? sources : 8;
	uint64_t every = PARAMS->arg1 ? PARAMS->arg1 : 1;
	uint64_t rng = (PARAMS->seed ^ (cpu << 48)) | 1;
	uint64_t n = STATUS->iterations[cpu];

	if (cpu == 0)
		puts("dup: start\n");
	for (;;) {
		n++;
		uint64_t first = rng_below(&rng, sources - fresh + 1);
		for (uint64_t i = 0; i < fresh; i++) {
			uint64_t *page = cpu_page(cpu, first + i);
			if (i % 2 == 0)
				fill_random(page, 512, &rng);
			else
				fill_text((uint8_t *)page, PAGE_SIZE, &rng);
		}
		for (int i = 0; i < 200; i++) {
			const uint64_t *from = cpu_page(cpu, first + rng_below(&rng, fresh));
			copy_words(cpu_page(cpu, sources + rng_below(&rng, targets)), from, 512);
		}
		for (int i = 0; i < 300; i++) {
			uint64_t words = 8ull << rng_below(&rng, 3);
			const uint64_t *from = cpu_page(cpu, first + rng_below(&rng, fresh)) +
					       rng_below(&rng, 512 / words) * words;
			uint64_t *to = cpu_page(cpu, sources) + rng_below(&rng, targets * 512 / words) * words;
			copy_words(to, from, words);
		}
		STATUS->iterations[cpu] = n;
		if (n % every == 0)
			outl(PORT_DOORBELL, (uint32_t)n);
	}
}
