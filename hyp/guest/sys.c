/* sys: a kernel-heavy load's memory behaviour (the `sys` workload). The vCPU's share
 * is 50% slab, 30% page pool, 20% page cache. Each iteration makes 2000
 * pointer-sized updates in the slab (list links, reference counts; skewed towards
 * hot objects), allocates 60 pool pages (zeroed, half of them given a header) and
 * copies 40 page-cache pages into the pool (copy-on-write, page cache reads).
 * arg1: ring the doorbell every arg1 iterations (0 means every iteration). */
#include "guest.h"

static inline uint64_t pointer(uint64_t *rng)
{
	return 0xffff888000000000ull | (rng_below(rng, 1ull << 30) << 6);
}

void guest_main(uint64_t cpu)
{
	uint64_t pages = cpu_pages();
	uint64_t slab_pages = pages / 2, pool_pages = pages * 3 / 10;
	uint64_t cache_pages = pages - slab_pages - pool_pages;
	uint64_t *slab = cpu_page(cpu, 0);
	uint64_t slab_words = slab_pages * 512;
	uint64_t every = PARAMS->arg1 ? PARAMS->arg1 : 1;
	uint64_t rng = (PARAMS->seed ^ (cpu << 48)) | 1;
	uint64_t n = STATUS->iterations[cpu];

	if (cpu == 0)
		puts("sys: start\n");
	if (n == 0) {
		/* Objects of 64 bytes: two links and a reference count. */
		for (uint64_t w = 0; w < slab_words; w += 8) {
			uint64_t p = pointer(&rng);
			slab[w] = p;
			slab[w + 1] = p;
			slab[w + 2] = rng_below(&rng, 16);
		}
		for (uint64_t i = 0; i < cache_pages; i++) {
			uint64_t *page = cpu_page(cpu, slab_pages + pool_pages + i);
			if (i % 2 == 0)
				fill_text((uint8_t *)page, PAGE_SIZE, &rng);
			else
				fill_random(page, 512, &rng);
		}
	}
	for (;;) {
		n++;
		for (int i = 0; i < 2000; i++) {
			uint64_t w = rng_skewed(&rng, slab_words);
			slab[w] = rng_below(&rng, 3) == 0 ? rng_below(&rng, 64) : pointer(&rng);
		}
		for (int i = 0; i < 60; i++) {
			uint64_t *page = cpu_page(cpu, slab_pages + rng_below(&rng, pool_pages));
			for (uint64_t w = 0; w < 512; w++)
				page[w] = 0;
			if (rng_below(&rng, 2) == 0)
				page[0] = pointer(&rng);
		}
		for (int i = 0; i < 40; i++) {
			uint64_t from = slab_pages + pool_pages + rng_skewed(&rng, cache_pages);
			uint64_t to = slab_pages + rng_below(&rng, pool_pages);
			copy_words(cpu_page(cpu, to), cpu_page(cpu, from), 512);
		}
		STATUS->iterations[cpu] = n;
		if (n % every == 0)
			outl(PORT_DOORBELL, (uint32_t)n);
	}
}
