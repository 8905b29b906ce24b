/* touch: writes exactly the data pages the VMM lists, for checking dirty tracking
 * against ground truth. It waits until the VMM asks for a new round, writes one word
 * into every page of the table, then rings the doorbell with the round number. It
 * writes nothing else: no stack, no status. One vCPU only. */
#include "guest.h"

void guest_main(uint64_t cpu)
{
	uint64_t done = 0;

	(void)cpu;
	for (;;) {
		uint64_t round;
		while ((round = PARAMS->round) == done)
			__asm__ volatile("pause");
		const volatile uint32_t *table = (const volatile uint32_t *)PARAMS->table;
		uint64_t len = PARAMS->table_len;
		for (uint64_t i = 0; i < len; i++) {
			uint64_t *p = data_page(table[i]);
			p[i % 512] = round;
		}
		done = round;
		outl(PORT_DOORBELL, (uint32_t)round);
	}
}
