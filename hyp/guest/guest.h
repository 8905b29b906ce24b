/* The ABI between the fgbi KVM micro-VM (hyp/src/kvm/guest.rs) and its guest
 * programs. Guests run as 64-bit user-mode (CPL3) code in identity-mapped memory;
 * the VMM sets everything up and enters every vCPU at the image's first byte with
 * its vCPU index in RDI (the first argument of _start) and its own stack. */
#ifndef FGBI_GUEST_H
#define FGBI_GUEST_H

#include <stdint.h>

/* The most vCPUs a VM has. Mirrors guest.rs. */
#define MAX_VCPUS 8

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
	uint64_t vcpus;      /* vCPUs running the program (1 to MAX_VCPUS) */
};

/* What the guest publishes; only the guest writes it. */
struct status {
	uint64_t iterations[MAX_VCPUS]; /* completed iterations, per vCPU */
};

#define PARAMS ((const volatile struct params *)0x8000)
#define STATUS ((volatile struct status *)0x9000)
#define PARAMS_MAGIC 0x6667626967756573ull
#define PAGE_SIZE 4096

#define PORT_CONSOLE 0x3f8  /* out8: one byte of console output */
#define PORT_DOORBELL 0x510 /* out32: low 32 bits of this vCPU's iteration count */
#define PORT_FAULT 0x511    /* out32: the guest found an inconsistency (a code) */
#define PORT_EXIT 0x512     /* out32: the program finished (0: success) */
#define PORT_KV 0x513       /* the key-value device: see below */

#define FAULT_PATTERN 1 /* a data word does not hold what the guest wrote */
#define FAULT_COUNTER 2 /* the counter in memory and in a register disagree */
#define FAULT_PARAMS 3  /* the parameter page was not filled */
#define FAULT_DEVICES 4 /* an in-kernel device lost its programming (pit.c) */

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline void outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
	return v;
}

static inline uint32_t inl(uint16_t port)
{
	uint32_t v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory");
	return v;
}

/* The key-value device (kv.c; the VMM's side is hyp/src/kvm/kv.rs): request and reply
 * slots in guest memory. `inl(PORT_KV)` waits in the VMM until requests arrive and
 * returns how many it wrote into request slots 0..n (0: none, ask again; the VMM
 * returns 0 when it stops the VM); the guest writes reply i into reply slot i and
 * submits them with `outl(PORT_KV, n)`.
 * A request slot: u32 bytes (of what follows), u32 argc, then argc times (u32 len,
 * len bytes). A reply slot: u32 bytes, u32 0, then the reply in RESP. */
#define KV_REQUESTS 0x100000ull
#define KV_REPLIES 0x140000ull
#define KV_SLOTS 32
#define KV_SLOT_BYTES 8192

static inline void puts(const char *s)
{
	while (*s)
		outb(PORT_CONSOLE, (uint8_t)*s++);
}

/* Prints v as 16 hex digits. */
static inline void put_hex(uint64_t v)
{
	for (int shift = 60; shift >= 0; shift -= 4)
		outb(PORT_CONSOLE, (uint8_t)"0123456789abcdef"[(v >> shift) & 15]);
}

/* Prints v in decimal. */
static inline void put_dec(uint64_t v)
{
	char digits[20];
	int n = 0;
	do {
		digits[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		outb(PORT_CONSOLE, (uint8_t)digits[--n]);
}

static inline void idle_forever(void)
{
	for (;;)
		__asm__ volatile("pause");
}

/* Reports a fault; the VMM parks the vCPU for good, so this never returns. */
static inline __attribute__((noreturn)) void fault(uint32_t code)
{
	outl(PORT_FAULT, code);
	idle_forever();
	__builtin_unreachable();
}

/* Reports that the program finished with `code`; the VMM parks the vCPU for good. */
static inline __attribute__((noreturn)) void finish(uint32_t code)
{
	outl(PORT_EXIT, code);
	idle_forever();
	__builtin_unreachable();
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

/* A uniform choice in 0..n. */
static inline uint64_t rng_below(uint64_t *state, uint64_t n)
{
	return (uint64_t)(((unsigned __int128)rng_next(state) * n) >> 64);
}

/* A choice in 0..n where four in five fall in the first fifth (hot data). */
static inline uint64_t rng_skewed(uint64_t *state, uint64_t n)
{
	uint64_t hot = n / 5 ? n / 5 : 1;
	return rng_below(state, 5) < 4 ? rng_below(state, hot) : rng_below(state, n);
}

/* Fills `words` words with random bits. */
static inline void fill_random(uint64_t *p, uint64_t words, uint64_t *rng)
{
	for (uint64_t w = 0; w < words; w++)
		p[w] = rng_next(rng);
}

/* Fills `bytes` bytes with text-like content: words and numbers, mostly repeated. */
static inline void fill_text(uint8_t *p, uint64_t bytes, uint64_t *rng)
{
	static const char *const words[8] = {
		"GET /index.html ", "HTTP/1.1 200 OK\n", "Content-Length: ", "session ",
		"<div class=\"item\">", "</div>\n", "request ", "response ",
	};
	uint64_t at = 0;
	while (at < bytes) {
		uint64_t r = rng_next(rng);
		const char *word = words[r & 7];
		if (r % 7 == 0) {
			p[at++] = (uint8_t)('0' + (r >> 8) % 10);
			continue;
		}
		while (*word && at < bytes)
			p[at++] = (uint8_t)*word++;
	}
}

/* Copies `words` words. */
static inline void copy_words(uint64_t *to, const uint64_t *from, uint64_t words)
{
	for (uint64_t w = 0; w < words; w++)
		to[w] = from[w];
}

static inline uint64_t vcpus(void)
{
	uint64_t n = PARAMS->vcpus;
	return n >= 1 && n <= MAX_VCPUS ? n : 1;
}

/* Page `page` of the whole data area. */
static inline uint64_t *data_page(uint64_t page)
{
	return (uint64_t *)(PARAMS->data_base + page * PAGE_SIZE);
}

/* Each vCPU works in its own equal share of the data area. */
static inline uint64_t cpu_pages(void)
{
	return PARAMS->data_pages / vcpus();
}

/* Page `page` of vCPU `cpu`'s share. */
static inline uint64_t *cpu_page(uint64_t cpu, uint64_t page)
{
	return data_page(cpu * cpu_pages() + page);
}

void guest_main(uint64_t cpu);

/* The entry point: first in the image (section .text.start), never returns. */
__attribute__((section(".text.start"), used, noreturn)) void _start(uint64_t cpu)
{
	if (PARAMS->magic != PARAMS_MAGIC || cpu >= vcpus())
		fault(FAULT_PARAMS);
	guest_main(cpu);
	idle_forever();
	__builtin_unreachable();
}

#endif
