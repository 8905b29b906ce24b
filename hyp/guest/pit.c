/* pit: the legacy devices KVM emulates in the kernel with an irqchip, driven through
 * their ports (no exits to the VMM): programs the two 8259 PICs (vectors 0x20 and
 * 0x28, the slave on IRQ 2, masks 0xa5 and 0x5a; IRQ 0 masked, and interrupts stay
 * off) and channel 0 of the 8254 PIT (mode 2, rate generator, divisor 0x4000:
 * about 73 periods a second), then polls: each pass reads the PIC masks and the
 * PIT's read-back status and faults (FAULT_DEVICES) if they are not what it
 * programmed (a restore that lost them), and counts PIT periods by latching the
 * counter; each period is an iteration and rings the doorbell. One vCPU. */
#include "guest.h"

#define PIC1_CMD 0x20
#define PIC1_DATA 0x21
#define PIC2_CMD 0xa0
#define PIC2_DATA 0xa1
#define PIT_CH0 0x40
#define PIT_CMD 0x43
#define MASTER_MASK 0xa5
#define SLAVE_MASK 0x5a
/* Channel 0, low then high byte, mode 2, binary: also its read-back status bits. */
#define PIT_MODE 0x34
#define PIT_DIVISOR 0x4000

static uint16_t pit_count(void)
{
	outb(PIT_CMD, 0x00); /* latch channel 0's count */
	uint8_t lo = inb(PIT_CH0);
	uint8_t hi = inb(PIT_CH0);
	return (uint16_t)(lo | hi << 8);
}

void guest_main(uint64_t cpu)
{
	(void)cpu;
	puts("pit: start\n");
	/* ICW1 (edge, cascade, ICW4), ICW2 (vector base), ICW3 (cascade), ICW4 (8086). */
	outb(PIC1_CMD, 0x11);
	outb(PIC1_DATA, 0x20);
	outb(PIC1_DATA, 0x04);
	outb(PIC1_DATA, 0x01);
	outb(PIC2_CMD, 0x11);
	outb(PIC2_DATA, 0x28);
	outb(PIC2_DATA, 0x02);
	outb(PIC2_DATA, 0x01);
	outb(PIC1_DATA, MASTER_MASK);
	outb(PIC2_DATA, SLAVE_MASK);
	outb(PIT_CMD, PIT_MODE);
	outb(PIT_CH0, PIT_DIVISOR & 0xff);
	outb(PIT_CH0, PIT_DIVISOR >> 8);

	uint64_t n = STATUS->iterations[0];
	uint16_t last = pit_count();
	for (;;) {
		if (inb(PIC1_DATA) != MASTER_MASK || inb(PIC2_DATA) != SLAVE_MASK)
			fault(FAULT_DEVICES);
		outb(PIT_CMD, 0xe2); /* read back channel 0's status only */
		if ((inb(PIT_CH0) & 0x3f) != PIT_MODE)
			fault(FAULT_DEVICES);
		uint16_t count = pit_count();
		if (count > last) { /* reloaded: a period ended */
			n++;
			STATUS->iterations[0] = n;
			outl(PORT_DOORBELL, (uint32_t)n);
		}
		last = count;
	}
}
