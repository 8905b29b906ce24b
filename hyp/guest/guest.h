/* The ABI between the fgbi KVM micro-VM (hyp/src/kvm/guest.rs) and its guest
 * programs. Guests run as 64-bit user-mode (CPL3) code in identity-mapped memory;
 * the VMM sets everything up and enters them at their first byte. */
#ifndef FGBI_GUEST_H
#define FGBI_GUEST_H

#include <stdint.h>

/* What the VMM tells the guest; the guest only reads it. Mirrors guest.rs. */
struct params {
	uint64_t magic;      /* PARAMS_MAGIC once the VMM has filled the page */
	uint64_t data_base;  /* guest-physical address of the data area */
	uint64_t data_pages; /* 4 KiB pages in the data area */
	uint64_t seed;       /* seed of the guest's random choices */
	uint64_t arg0;       /* program-specific: see each program */
	uint64_t arg1;       /* program-specific: see each program */
	uint64_t round;      /* touch: the round the VMM asks for */
	uint64_t table;      /* touch: address of the table of data pages to write */
	uint64_t table_len;  /* touch: entries in the table */
};

/* What the guest publishes; only the guest writes it. */
struct status {
	uint64_t iterations; /* completed iterations of the program's loop */
};

#define PARAMS ((const volatile struct params *)0x8000)
#define STATUS ((volatile struct status *)0x9000)
#define PARAMS_MAGIC 0x6667626967756573ull

#define PORT_CONSOLE 0x3f8  /* out8: one byte of console output */
#define PORT_DOORBELL 0x510 /* out32: low 32 bits of the iteration count */
#define PORT_FAULT 0x511    /* out32: the guest found an inconsistency (a code) */

#define FAULT_PATTERN 1 /* a data word does not hold what the guest wrote */
#define FAULT_COUNTER 2 /* the counter in memory and in a register disagree */
#define FAULT_PARAMS 3  /* the parameter page was not filled */

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline void outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline void puts(const char *s)
{
	while (*s)
		outb(PORT_CONSOLE, (uint8_t)*s++);
}

/* Reports a fault; the VMM parks the vCPU for good, so this never returns. */
static inline __attribute__((noreturn)) void fault(uint32_t code)
{
	outl(PORT_FAULT, code);
	for (;;)
		__asm__ volatile("pause");
}

/* xorshift64*: the guest's source of scattered choices. */
static inline uint64_t rng_next(uint64_t *state)
{
	uint64_t x = *state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*state = x;
	return x * 0x2545F4914F6CDD1Dull;
}

static inline uint64_t *data_page(uint64_t page)
{
	return (uint64_t *)(PARAMS->data_base + page * 4096);
}

void guest_main(void);

/* The entry point: first in the image (section .text.start), never returns. */
__attribute__((section(".text.start"), used, noreturn)) void _start(void)
{
	if (PARAMS->magic != PARAMS_MAGIC)
		fault(FAULT_PARAMS);
	guest_main();
	for (;;)
		__asm__ volatile("pause");
}

#endif
