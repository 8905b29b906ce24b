/* kv: a key-value store living in guest memory, served through the key-value device
 * (guest.h): it takes a batch of requests from the request slots, applies each to the
 * store, writes each reply (RESP) into the matching reply slot and submits the batch.
 * The store: a meta page, a table of bucket heads (chained records), and an arena
 * of records in size classes of 32 bytes to 32 KiB with a free list per class. It
 * lives entirely in the data area, so a checkpoint of memory is a checkpoint of the
 * store. Commands: PING, ECHO, GET, SET, DEL, EXISTS, INCR, DECR, INCRBY, DECRBY,
 * MGET, MSET, DBSIZE, FLUSHALL, FLUSHDB, CONFIG GET, COMMAND. One vCPU. */
#include "guest.h"

#define STORE_MAGIC 0x6b76737430303031ull
#define CLASSES 11 /* record sizes 32 << class */
#define MAX_ARGS 64
#define HEADER 24

struct meta {
	uint64_t magic;
	uint64_t buckets;   /* a power of two */
	uint64_t arena;     /* offset of the arena from the data area */
	uint64_t top;       /* first never-used arena byte (offset) */
	uint64_t end;       /* end of the data area (offset) */
	uint64_t keys;
	uint64_t free[CLASSES]; /* offsets of free records, linked through `next` */
};

struct record {
	uint64_t next; /* offset of the next record in the bucket or free list (0: none) */
	uint32_t klen, vlen;
	uint32_t cls, pad;
	uint8_t bytes[]; /* key, then value */
};

struct arg {
	const uint8_t *p;
	uint32_t len;
};

struct out {
	uint8_t *p;
	uint32_t len, cap;
	int overflow;
};

/* The store's parts, at fixed places in the data area: no writable globals, so
 * everything the store holds is in the data area. */
#define base ((uint8_t *)data_page(0))
#define meta ((struct meta *)base)
#define bucket ((uint64_t *)(base + PAGE_SIZE))

static inline struct record *at(uint64_t offset)
{
	return (struct record *)(base + offset);
}

static uint64_t hash(const uint8_t *p, uint32_t len)
{
	uint64_t h = 0xcbf29ce484222325ull;
	for (uint32_t i = 0; i < len; i++)
		h = (h ^ p[i]) * 0x100000001b3ull;
	return h;
}

static int same(const uint8_t *a, uint32_t alen, const uint8_t *b, uint32_t blen)
{
	if (alen != blen)
		return 0;
	for (uint32_t i = 0; i < alen; i++)
		if (a[i] != b[i])
			return 0;
	return 1;
}

/* Case-insensitive comparison of an argument with an upper-case name. */
static int is(struct arg a, const char *name)
{
	uint32_t i = 0;
	for (; name[i]; i++) {
		uint8_t c = i < a.len ? a.p[i] : 0;
		if (c >= 'a' && c <= 'z')
			c = (uint8_t)(c - 32);
		if (c != (uint8_t)name[i])
			return 0;
	}
	return i == a.len;
}

static void copy(uint8_t *to, const uint8_t *from, uint64_t len)
{
	for (uint64_t i = 0; i < len; i++)
		to[i] = from[i];
}

static void format(void)
{
	uint64_t bytes = PARAMS->data_pages * PAGE_SIZE;
	uint64_t buckets = 1;
	while (buckets * 2 * 8 * 16 <= bytes)
		buckets *= 2;
	meta->buckets = buckets;
	meta->arena = PAGE_SIZE + ((buckets * 8 + PAGE_SIZE - 1) & ~(uint64_t)(PAGE_SIZE - 1));
	meta->top = meta->arena;
	meta->end = bytes;
	meta->keys = 0;
	for (int c = 0; c < CLASSES; c++)
		meta->free[c] = 0;
	for (uint64_t i = 0; i < buckets; i++)
		bucket[i] = 0;
	meta->magic = STORE_MAGIC;
}

/* The record of `key` and the link that points at it; 0 if absent. */
static uint64_t find(struct arg key, uint64_t **link)
{
	uint64_t *l = &bucket[hash(key.p, key.len) & (meta->buckets - 1)];
	while (*l) {
		struct record *r = at(*l);
		if (same(r->bytes, r->klen, key.p, key.len)) {
			*link = l;
			return *l;
		}
		l = &r->next;
	}
	*link = l;
	return 0;
}

static int class_of(uint64_t bytes)
{
	for (int c = 0; c < CLASSES; c++)
		if (bytes <= (32ull << c))
			return c;
	return -1;
}

/* A record of at least `bytes` bytes (header included), or 0 if the arena is full. */
static uint64_t alloc(uint64_t bytes, int *cls)
{
	int c = class_of(bytes);
	if (c < 0)
		return 0;
	*cls = c;
	if (meta->free[c]) {
		uint64_t r = meta->free[c];
		meta->free[c] = at(r)->next;
		return r;
	}
	if (meta->top + (32ull << c) > meta->end)
		return 0;
	uint64_t r = meta->top;
	meta->top += 32ull << c;
	return r;
}

static void release(uint64_t r)
{
	struct record *rec = at(r);
	rec->next = meta->free[rec->cls];
	meta->free[rec->cls] = r;
}

static int del(struct arg key)
{
	uint64_t *link;
	uint64_t r = find(key, &link);
	if (!r)
		return 0;
	*link = at(r)->next;
	release(r);
	meta->keys--;
	return 1;
}

/* Sets key to value; 0 if the store is full. */
static int set(struct arg key, struct arg value)
{
	uint64_t *link;
	uint64_t r = find(key, &link);
	uint64_t need = HEADER + key.len + value.len;
	if (r && need <= (32ull << at(r)->cls)) {
		struct record *rec = at(r);
		copy(rec->bytes + rec->klen, value.p, value.len);
		rec->vlen = value.len;
		return 1;
	}
	int cls;
	uint64_t fresh = alloc(need, &cls);
	if (!fresh)
		return 0;
	if (r)
		del(key);
	struct record *rec = at(fresh);
	rec->klen = key.len;
	rec->vlen = value.len;
	rec->cls = (uint32_t)cls;
	copy(rec->bytes, key.p, key.len);
	copy(rec->bytes + key.len, value.p, value.len);
	uint64_t *head = &bucket[hash(key.p, key.len) & (meta->buckets - 1)];
	rec->next = *head;
	*head = fresh;
	meta->keys++;
	return 1;
}

static void put(struct out *o, const void *p, uint32_t len)
{
	if (o->overflow || o->len + len > o->cap) {
		o->overflow = 1;
		return;
	}
	copy(o->p + o->len, p, len);
	o->len += len;
}

static void put_str(struct out *o, const char *s)
{
	uint32_t len = 0;
	while (s[len])
		len++;
	put(o, s, len);
}

static void put_number(struct out *o, char kind, int64_t v)
{
	char text[24];
	int n = 0;
	uint64_t u = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;
	do {
		text[n++] = (char)('0' + u % 10);
		u /= 10;
	} while (u);
	put(o, &kind, 1);
	if (v < 0)
		put(o, "-", 1);
	while (n)
		put(o, &text[--n], 1);
	put(o, "\r\n", 2);
}

static void put_bulk(struct out *o, const uint8_t *p, uint32_t len)
{
	put_number(o, '$', len);
	put(o, p, len);
	put(o, "\r\n", 2);
}

static void put_value(struct out *o, struct arg key)
{
	uint64_t *link;
	uint64_t r = find(key, &link);
	if (!r) {
		put_str(o, "$-1\r\n");
		return;
	}
	struct record *rec = at(r);
	put_bulk(o, rec->bytes + rec->klen, rec->vlen);
}

/* A signed 64-bit decimal, or 0 if `a` is not one. */
static int integer(const uint8_t *p, uint32_t len, int64_t *value)
{
	int negative = len > 0 && p[0] == '-';
	uint32_t i = (uint32_t)negative;
	uint64_t v = 0;
	if (i == len || len > 20)
		return 0;
	for (; i < len; i++) {
		if (p[i] < '0' || p[i] > '9')
			return 0;
		uint64_t next = v * 10 + (uint64_t)(p[i] - '0');
		if (next / 10 != v)
			return 0;
		v = next;
	}
	if (negative ? v > (1ull << 63) : v > (1ull << 63) - 1)
		return 0;
	*value = negative ? (int64_t)(0 - v) : (int64_t)v;
	return 1;
}

static void add(struct out *o, struct arg key, int64_t delta)
{
	uint64_t *link;
	uint64_t r = find(key, &link);
	int64_t v = 0;
	if (r) {
		struct record *rec = at(r);
		if (!integer(rec->bytes + rec->klen, rec->vlen, &v)) {
			put_str(o, "-ERR value is not an integer or out of range\r\n");
			return;
		}
	}
	if ((delta > 0 && v > INT64_MAX - delta) || (delta < 0 && v < INT64_MIN - delta)) {
		put_str(o, "-ERR increment or decrement would overflow\r\n");
		return;
	}
	v += delta;
	/* The new value's digits, via the reply writer into a scratch buffer. */
	uint8_t digits[32];
	struct out text = {digits, 0, sizeof(digits), 0};
	put_number(&text, ':', v);
	struct arg value = {digits + 1, text.len - 3};
	if (!set(key, value)) {
		put_str(o, "-ERR out of memory in the VM's store\r\n");
		return;
	}
	put_number(o, ':', v);
}

static void config_get(struct out *o, struct arg name)
{
	if (is(name, "SAVE")) {
		put_str(o, "*2\r\n$4\r\nsave\r\n$0\r\n\r\n");
	} else if (is(name, "APPENDONLY")) {
		put_str(o, "*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n");
	} else {
		put_str(o, "*0\r\n");
	}
}

static void execute(struct arg *a, uint32_t n, struct out *o)
{
	struct arg none = {0, 0};
	struct arg cmd = n ? a[0] : none;
	int64_t by;
	if (n == 0) {
		put_str(o, "-ERR empty request\r\n");
	} else if (is(cmd, "PING") && n <= 2) {
		if (n == 2)
			put_bulk(o, a[1].p, a[1].len);
		else
			put_str(o, "+PONG\r\n");
	} else if (is(cmd, "ECHO") && n == 2) {
		put_bulk(o, a[1].p, a[1].len);
	} else if (is(cmd, "GET") && n == 2) {
		put_value(o, a[1]);
	} else if (is(cmd, "SET") && n == 3) {
		put_str(o, set(a[1], a[2]) ? "+OK\r\n" : "-ERR out of memory in the VM's store\r\n");
	} else if (is(cmd, "SET") && n > 3) {
		put_str(o, "-ERR syntax error: this store takes SET key value only\r\n");
	} else if ((is(cmd, "DEL") || is(cmd, "EXISTS")) && n >= 2) {
		int64_t count = 0;
		for (uint32_t i = 1; i < n; i++) {
			uint64_t *link;
			count += is(cmd, "DEL") ? del(a[i]) : find(a[i], &link) != 0;
		}
		put_number(o, ':', count);
	} else if (is(cmd, "INCR") && n == 2) {
		add(o, a[1], 1);
	} else if (is(cmd, "DECR") && n == 2) {
		add(o, a[1], -1);
	} else if ((is(cmd, "INCRBY") || is(cmd, "DECRBY")) && n == 3) {
		if (!integer(a[2].p, a[2].len, &by) || (is(cmd, "DECRBY") && by == INT64_MIN))
			put_str(o, "-ERR value is not an integer or out of range\r\n");
		else
			add(o, a[1], is(cmd, "DECRBY") ? -by : by);
	} else if (is(cmd, "MGET") && n >= 2) {
		put_number(o, '*', n - 1);
		for (uint32_t i = 1; i < n; i++)
			put_value(o, a[i]);
	} else if (is(cmd, "MSET") && n >= 3 && n % 2 == 1) {
		int ok = 1;
		for (uint32_t i = 1; i < n; i += 2)
			ok &= set(a[i], a[i + 1]);
		put_str(o, ok ? "+OK\r\n" : "-ERR out of memory in the VM's store\r\n");
	} else if (is(cmd, "DBSIZE") && n == 1) {
		put_number(o, ':', (int64_t)meta->keys);
	} else if ((is(cmd, "FLUSHALL") || is(cmd, "FLUSHDB")) && n <= 2) {
		format();
		put_str(o, "+OK\r\n");
	} else if (is(cmd, "CONFIG") && n == 3 && is(a[1], "GET")) {
		config_get(o, a[2]);
	} else if (is(cmd, "COMMAND")) {
		put_str(o, "*0\r\n");
	} else {
		put_str(o, "-ERR unknown command or wrong number of arguments\r\n");
	}
}

static inline uint32_t u32_at(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Applies request slot i and writes reply slot i. */
static void serve(uint32_t i)
{
	const uint8_t *request = (const uint8_t *)(KV_REQUESTS + (uint64_t)i * KV_SLOT_BYTES);
	uint8_t *reply = (uint8_t *)(KV_REPLIES + (uint64_t)i * KV_SLOT_BYTES);
	struct out o = {reply + 8, 0, KV_SLOT_BYTES - 8, 0};
	struct arg args[MAX_ARGS];
	uint32_t bytes = u32_at(request), argc = u32_at(request + 4), used = 0;
	int bad = bytes > KV_SLOT_BYTES - 8 || argc > MAX_ARGS;
	for (uint32_t k = 0; !bad && k < argc; k++) {
		if (used + 4 > bytes) {
			bad = 1;
			break;
		}
		args[k].len = u32_at(request + 8 + used);
		args[k].p = request + 8 + used + 4;
		used += 4 + args[k].len;
		bad = used > bytes;
	}
	if (bad)
		put_str(&o, "-ERR malformed request slot (or more than 64 arguments)\r\n");
	else
		execute(args, argc, &o);
	if (o.overflow) {
		o.overflow = 0;
		o.len = 0;
		put_str(&o, "-ERR reply larger than the device's reply slot\r\n");
	}
	for (int b = 0; b < 4; b++)
		reply[b] = (uint8_t)(o.len >> (8 * b));
	for (int b = 4; b < 8; b++)
		reply[b] = 0;
}

void guest_main(uint64_t cpu)
{
	(void)cpu;
	if (meta->magic != STORE_MAGIC)
		format();
	puts("kv: ready\n");
	for (;;) {
		uint32_t n = inl(PORT_KV);
		if (n > KV_SLOTS)
			n = KV_SLOTS;
		for (uint32_t i = 0; i < n; i++)
			serve(i);
		if (n) {
			STATUS->iterations[0] += n;
			outl(PORT_KV, n);
		}
	}
}
