/*
 * memtest — a CRIU checkpoint/restore test workload.
 *
 *   memtest MIB HEARTBEAT_FILE [CHILDREN]
 *
 * Start it detached, e.g.
 *   setsid ./memtest 256 /tmp/mt/hb 2 </dev/null >/dev/null 2>&1 &
 * (use an absolute HEARTBEAT_FILE; no tty is needed or used).
 *
 * Files (HB = HEARTBEAT_FILE; every file except .log is written tmp+rename):
 *   HB.pid        "<pid>\n" of the parent (setsid may fork, so $! can lie)
 *   HB.state      "checksum=<16 hex> mib=<n>\n"     written once at start-up
 *   HB.state.<i>  the same for child i (its buffer is max(MIB/8,1) MiB)
 *   HB            "<counter>\n", rewritten every 100 ms; first written once
 *                 the parent AND all children have filled their buffers
 *   HB.log        one line per second, appended through a fd kept open
 *   HB.verify     after SIGUSR1: first line exactly "verify=ok" or "verify=BAD",
 *                 then "gen=<n>", "checksum=<hex>", "children_ok=<k>/<K>".
 *                 Written after the children have answered, so it covers them.
 *   HB.verify.<i> child i's own result, first line "verify=ok"/"verify=BAD".
 *
 * Children are connected by two pipes each. Every 100 ms the parent sends a
 * 'p' byte to each child, which echoes it; on SIGUSR1 the parent re-checks its
 * buffer and sends 'V'; the child re-checks and answers 'v' (ok) or 'x' (bad).
 * A child also verifies on its own SIGUSR1. Children exit on pipe EOF.
 * SIGUSR2 makes the parent rewrite 2% of its buffer with new noise, in 128 KiB
 * runs spread evenly over it (a changing service between two checkpoints), and
 * update its checksum; it then appends "mutated=<n>" to HB.log. MEMTEST_MUTATE
 * (below) changes what SIGUSR2 does.
 * SIGTERM/SIGINT make the parent kill its children and exit 0.
 * At start-up all inherited fds >= 3 are closed; the tree then holds only
 * stdio, the HB.log fd (parent) and the pipes.
 *
 * Environment (optional):
 *   MEMTEST_FILL=random  (default) every buffer is xorshift64* noise
 *   MEMTEST_TICK_MS=N    heartbeat period (default 100; benchmarks timing the first
 *                        heartbeat after a restore use 10)
 *   MEMTEST_FILL=mixed   buffers get realistic mixed compressibility, in
 *                        128 KiB regions: ~35% noise, ~30% text log lines,
 *                        ~15% heap-like structs, ~15% bytes copied from a
 *                        shared library, ~5% zeros
 *   MEMTEST_MUTATE=runs  (default) SIGUSR2 as above
 *   MEMTEST_MUTATE=pages SIGUSR2 rewrites one 4 KiB page in 50, evenly scattered
 *                        (2% of the buffer, the worst case for chunk-level dedup)
 *   MEMTEST_MUTATE=insert  the first SIGUSR2 also maps MEMTEST_INSERT_MIB (default
 *                        100) MiB of fresh noise just below the buffer, so in CRIU's
 *                        pages image every page of the buffer moves by that much;
 *                        verification (SIGUSR1) covers it too
 *
 * Build: gcc -O2 -static -o memtest memtest.c   (or without -static)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_CHILDREN 64
#define VERIFY_TIMEOUT_MS 300000

static volatile sig_atomic_t got_usr1, got_usr2, got_term;

static void on_usr1(int s) { (void)s; got_usr1 = 1; }
static void on_usr2(int s) { (void)s; got_usr2 = 1; }
static void on_term(int s) { (void)s; got_term = 1; }

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, ": %s\n", strerror(errno));
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static long tick_ms = 100;

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	nanosleep(&ts, NULL); /* EINTR (signal) just ends the tick early */
}

/* Atomically replace `path` with `text` (tmp file + rename). */
static void write_file(const char *path, const char *text)
{
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int)getpid());
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open %s", tmp);
	size_t len = strlen(text), off = 0;
	while (off < len) {
		ssize_t n = write(fd, text + off, len - off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("write %s", tmp);
		off += (size_t)n;
	}
	close(fd);
	if (rename(tmp, path) < 0)
		die("rename %s", tmp);
}

/* ---- buffer: xorshift64* fill and FNV-1a-over-words checksum ---- */

struct buf {
	uint64_t *w;
	size_t nwords;
	size_t mib;
	uint64_t checksum; /* computed right after filling */
};

static uint64_t checksum(const struct buf *b);

/* Rewrites 2% of the buffer with fresh noise, in runs of `run_bytes` spread evenly. */
static void buf_mutate(struct buf *b, uint64_t *x, size_t run_bytes)
{
	size_t run = run_bytes / sizeof(uint64_t);
	size_t runs = b->nwords / run;
	size_t every = 50; /* one run in 50: 2% */
	for (size_t r = every / 2; r < runs; r += every)
		for (size_t i = r * run; i < (r + 1) * run; i++) {
			*x ^= *x >> 12;
			*x ^= *x << 25;
			*x ^= *x >> 27;
			b->w[i] = *x * 0x2545f4914f6cdd1dULL;
		}
	b->checksum = checksum(b);
}

static uint64_t checksum(const struct buf *b)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < b->nwords; i++) {
		h ^= b->w[i];
		h *= 0x100000001b3ULL;
	}
	return h ^ b->nwords;
}

/* ---- optional mixed fill (MEMTEST_FILL=mixed) ---- */

static int fill_mixed;
static unsigned char *lib_bytes;
static size_t lib_len;

static uint64_t xs_next(uint64_t *x)
{
	*x ^= *x >> 12;
	*x ^= *x << 25;
	*x ^= *x >> 27;
	return *x * 0x2545F4914F6CDD1DULL;
}

static void load_lib_bytes(void)
{
	static const char *cands[] = { "/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6",
				       "/usr/lib/libc.so.6", "/proc/self/exe" };
	for (size_t i = 0; i < sizeof(cands) / sizeof(cands[0]) && !lib_bytes; i++) {
		FILE *f = fopen(cands[i], "rb");
		if (!f)
			continue;
		size_t cap = 8 << 20, n = 0;
		unsigned char *p = malloc(cap);
		if (p) {
			n = fread(p, 1, cap, f);
			if (n >= (256 << 10)) {
				lib_bytes = p;
				lib_len = n;
			} else {
				free(p);
			}
		}
		fclose(f);
	}
}

static const char *const w_lvl[] = { "info", "info", "info", "debug", "warn", "error" };
static const char *const w_svc[] = { "orders-api", "billing", "auth", "search", "cart", "inventory" };
static const char *const w_meth[] = { "GET", "GET", "GET", "POST", "PUT", "DELETE" };
static const char *const w_path[] = { "/v1/orders/", "/v1/users/", "/v2/items/", "/v1/cart/", "/healthz?id=", "/v1/search?q=" };
static const char *const w_name[] = { "session_cache", "http_conn", "order_line", "user_record", "lru_node", "json_value", "tls_ctx", "buffer_pool" };

static void fill_text(char *p, size_t len, uint64_t *x, uint64_t *clock_ms)
{
	size_t off = 0;
	char line[512];
	while (off < len) {
		uint64_t r = xs_next(x);
		*clock_ms += r % 17;
		uint64_t t = *clock_ms;
		int n = snprintf(line, sizeof(line),
				 "2025-11-%02u %02u:%02u:%02u.%03u level=%s svc=%s host=node-%02u req=%016" PRIx64
				 " method=%s path=%s%u status=%u bytes=%u dur_ms=%u.%03u\n",
				 (unsigned)(1 + (t / 86400000) % 28), (unsigned)(t / 3600000 % 24), (unsigned)(t / 60000 % 60),
				 (unsigned)(t / 1000 % 60), (unsigned)(t % 1000), w_lvl[r % 6], w_svc[(r >> 3) % 6],
				 (unsigned)((r >> 6) % 12), xs_next(x), w_meth[(r >> 10) % 6], w_path[(r >> 13) % 6],
				 (unsigned)((r >> 16) % 200000), (r >> 34) % 20 ? 200u : 404u + (unsigned)((r >> 40) % 100),
				 (unsigned)((r >> 20) % 65536), (unsigned)((r >> 36) % 250), (unsigned)((r >> 44) % 1000));
		size_t m = (size_t)n < len - off ? (size_t)n : len - off;
		memcpy(p + off, line, m);
		off += m;
	}
}

struct heap_rec { /* 64 bytes, like a small heap object */
	uint64_t next, prev;
	uint32_t id, flags;
	double value;
	char name[16];
	uint64_t refcount;
	uint32_t pad[2];
};

static void fill_structs(void *dst, size_t len, uint64_t *x, uint64_t base, uint32_t *id)
{
	struct heap_rec *r = dst;
	for (size_t i = 0; i < len / sizeof(*r); i++) {
		uint64_t v = xs_next(x);
		memset(&r[i], 0, sizeof(r[i]));
		r[i].next = base + ((i + 1 + (v & 7)) * 64);
		r[i].prev = i ? base + (i - 1) * 64 : 0;
		r[i].id = (*id)++;
		r[i].flags = (uint32_t)(v >> 8) & 0x13;
		r[i].value = (double)((v >> 16) % 100000) / 100.0;
		snprintf(r[i].name, sizeof(r[i].name), "%s", w_name[(v >> 40) % 8]);
		r[i].refcount = 1 + ((v >> 50) % 4);
	}
}

static void buf_fill_mixed(unsigned char *p, size_t bytes, uint64_t x)
{
	const size_t region = 128 << 10;
	uint64_t clock_ms = 1700000000000ULL % (28ULL * 86400000);
	uint32_t id = 1;
	for (size_t off = 0; off < bytes; off += region) {
		size_t len = bytes - off < region ? bytes - off : region;
		unsigned kind = (unsigned)(xs_next(&x) % 100);
		if (kind < 35 || (kind >= 80 && kind < 95 && !lib_bytes)) { /* noise */
			uint64_t *w = (uint64_t *)(p + off);
			for (size_t i = 0; i < len / 8; i++)
				w[i] = xs_next(&x);
		} else if (kind < 65) {
			fill_text((char *)p + off, len, &x, &clock_ms);
		} else if (kind < 80) {
			fill_structs(p + off, len, &x, 0x7f0000000000ULL + ((uint64_t)(uintptr_t)(p + off) & 0xffffffffffULL), &id);
		} else if (kind < 95) { /* a page-aligned slice of a library file */
			size_t src = lib_len > len ? (size_t)(xs_next(&x) % (lib_len - len)) & ~(size_t)4095 : 0;
			size_t m = len < lib_len - src ? len : lib_len - src;
			memcpy(p + off, lib_bytes + src, m);
			memset(p + off + m, 0, len - m);
		} else {
			memset(p + off, 0, len);
		}
	}
}

static void buf_init(struct buf *b, size_t mib, uint64_t seed)
{
	size_t bytes = mib << 20;
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap %zu MiB", mib);
	b->w = p;
	b->nwords = bytes / sizeof(uint64_t);
	b->mib = mib;
	uint64_t x = seed ? seed : 0x9e3779b97f4a7c15ULL;
	if (fill_mixed) {
		buf_fill_mixed(p, bytes, x);
		b->checksum = checksum(b);
		return;
	}
	for (size_t i = 0; i < b->nwords; i++) {
		x ^= x >> 12;
		x ^= x << 25;
		x ^= x >> 27;
		b->w[i] = x * 0x2545F4914F6CDD1DULL;
	}
	b->checksum = checksum(b);
}

static void write_state(const char *path, const struct buf *b)
{
	char text[128];
	snprintf(text, sizeof(text), "checksum=%016" PRIx64 " mib=%zu\n", b->checksum, b->mib);
	write_file(path, text);
}

/* The mapping MEMTEST_MUTATE=insert adds (nwords 0 until then). */
static struct buf inserted;

/* Maps `mib` MiB of fresh noise just below `below` (or anywhere free, if that is taken). */
static void insert_mapping(struct buf *ins, const struct buf *below, size_t mib, uint64_t seed)
{
	size_t bytes = mib << 20;
	uintptr_t want = ((uintptr_t)below->w - bytes - (64u << 20)) & ~(uintptr_t)0xfffff;
	void *p = mmap((void *)want, bytes, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	if (p == MAP_FAILED)
		die("mmap %zu MiB below the buffer", mib);
	ins->w = p;
	ins->nwords = bytes / sizeof(uint64_t);
	ins->mib = mib;
	uint64_t x = seed | 1;
	for (size_t i = 0; i < ins->nwords; i++)
		ins->w[i] = xs_next(&x);
	ins->checksum = checksum(ins);
}

/* Re-verify; returns 1 if ok. Writes the verdict file. */
static int verify(const char *path, const struct buf *b, unsigned gen, const char *extra, int extra_ok)
{
	uint64_t c = checksum(b);
	int ok = (c == b->checksum) && extra_ok;
	if (inserted.nwords && checksum(&inserted) != inserted.checksum)
		ok = 0;
	char text[512];
	snprintf(text, sizeof(text), "verify=%s\ngen=%u\nchecksum=%016" PRIx64 "\nexpected=%016" PRIx64 "\n%s",
		 ok ? "ok" : "BAD", gen, c, b->checksum, extra ? extra : "");
	write_file(path, text);
	return ok;
}

/* ---- child ---- */

static void child_main(int idx, int rfd, int wfd, const char *hb, size_t mib, uint64_t seed)
{
	char path[4096];
	struct buf b;
	unsigned gen = 0;

	buf_init(&b, mib, seed);
	snprintf(path, sizeof(path), "%s.state.%d", hb, idx);
	write_state(path, &b);
	snprintf(path, sizeof(path), "%s.verify.%d", hb, idx);

	char c = 'r';
	if (write(wfd, &c, 1) != 1)
		_exit(1);
	for (;;) {
		if (got_usr1) { /* SIGUSR1 sent straight to the child */
			got_usr1 = 0;
			verify(path, &b, ++gen, NULL, 1);
		}
		ssize_t n = read(rfd, &c, 1);
		if (n == 0)
			_exit(0); /* parent gone */
		if (n < 0) {
			if (errno == EINTR)
				continue;
			_exit(1);
		}
		if (c == 'V')
			c = verify(path, &b, ++gen, NULL, 1) ? 'v' : 'x';
		while (write(wfd, &c, 1) < 0 && errno == EINTR)
			;
	}
}

/* ---- parent ---- */

struct child {
	pid_t pid;
	int to, from; /* parent's ends */
	int alive;
	int verdict; /* -1 pending, 0 bad, 1 ok */
	unsigned long echoes;
};

static struct child kids[MAX_CHILDREN];
static int nkids;

/* Drain whatever children have sent; returns number of readable fds handled. */
static void drain_children(int timeout_ms)
{
	struct pollfd pfd[MAX_CHILDREN];
	int map[MAX_CHILDREN], n = 0;
	for (int i = 0; i < nkids; i++)
		if (kids[i].alive) {
			pfd[n].fd = kids[i].from;
			pfd[n].events = POLLIN;
			map[n++] = i;
		}
	if (n == 0 || poll(pfd, n, timeout_ms) <= 0)
		return;
	for (int j = 0; j < n; j++) {
		if (!(pfd[j].revents & (POLLIN | POLLHUP | POLLERR)))
			continue;
		struct child *k = &kids[map[j]];
		char buf[256];
		ssize_t r = read(k->from, buf, sizeof(buf));
		if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
			k->alive = 0;
			if (k->verdict < 0)
				k->verdict = 0;
			continue;
		}
		for (ssize_t q = 0; q < r; q++) {
			if (buf[q] == 'p' || buf[q] == 'r')
				k->echoes++;
			else if (buf[q] == 'v')
				k->verdict = 1;
			else if (buf[q] == 'x')
				k->verdict = 0;
		}
	}
}

static void send_all(char c)
{
	for (int i = 0; i < nkids; i++)
		if (kids[i].alive && write(kids[i].to, &c, 1) < 0 && errno != EAGAIN && errno != EINTR)
			kids[i].alive = 0;
}

static int alive_count(void)
{
	int a = 0;
	for (int i = 0; i < nkids; i++)
		a += kids[i].alive;
	return a;
}

static uint64_t elapsed_ms_since(uint64_t t0) { return (now_ns() - t0) / 1000000u; }

int main(int argc, char **argv)
{
	if (argc < 3 || argc > 4) {
		fprintf(stderr, "usage: %s MIB HEARTBEAT_FILE [CHILDREN]\n", argv[0]);
		return 2;
	}
	char *end;
	long mib = strtol(argv[1], &end, 10);
	if (*end || mib < 1) {
		fprintf(stderr, "bad MIB: %s\n", argv[1]);
		return 2;
	}
	const char *hb = argv[2];
	long nchildren = argc == 4 ? strtol(argv[3], &end, 10) : 0;
	if (argc == 4 && (*end || nchildren < 0 || nchildren > MAX_CHILDREN)) {
		fprintf(stderr, "bad CHILDREN (0..%d): %s\n", MAX_CHILDREN, argv[3]);
		return 2;
	}

	const char *mutate = getenv("MEMTEST_MUTATE");
	int mutate_pages = 0, mutate_insert = 0;
	if (mutate && *mutate && strcmp(mutate, "runs") != 0) {
		mutate_pages = strcmp(mutate, "pages") == 0;
		mutate_insert = strcmp(mutate, "insert") == 0;
		if (!mutate_pages && !mutate_insert) {
			fprintf(stderr, "bad MEMTEST_MUTATE (runs|pages|insert): %s\n", mutate);
			return 2;
		}
	}
	const char *insert_mib = getenv("MEMTEST_INSERT_MIB");
	size_t insert_size = insert_mib && atol(insert_mib) > 0 ? (size_t)atol(insert_mib) : 100;
	const char *fill = getenv("MEMTEST_FILL");
	const char *tick = getenv("MEMTEST_TICK_MS");
	if (tick && atol(tick) > 0)
		tick_ms = atol(tick);
	if (fill && *fill && strcmp(fill, "random") != 0) {
		if (strcmp(fill, "mixed") != 0) {
			fprintf(stderr, "bad MEMTEST_FILL (random|mixed): %s\n", fill);
			return 2;
		}
		fill_mixed = 1;
		load_lib_bytes();
	}

	/* Drop fds inherited from whoever started us (an inherited pipe to an
	 * outside process would become part of the checkpoint). */
	if (close_range(3, ~0U, 0) < 0)
		for (int fd = 3; fd < 1024; fd++)
			close(fd);

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sigemptyset(&sa.sa_mask);
	sa.sa_handler = on_usr1; /* no SA_RESTART: interrupt sleeps/reads */
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_usr2;
	sigaction(SIGUSR2, &sa, NULL);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGHUP, SIG_IGN);

	char path[4096], text[1024];
	uint64_t seed = now_ns() ^ ((uint64_t)getpid() << 32) ^ 0xd1b54a32d192ed03ULL;

	snprintf(text, sizeof(text), "%d\n", (int)getpid());
	snprintf(path, sizeof(path), "%s.pid", hb);
	write_file(path, text);

	/* Fork children before the big mmap so they do not inherit it. */
	size_t child_mib = (size_t)mib / 8 ? (size_t)mib / 8 : 1;
	for (int i = 0; i < nchildren; i++) {
		int down[2], up[2];
		if (pipe2(down, O_CLOEXEC) < 0 || pipe2(up, O_CLOEXEC) < 0)
			die("pipe");
		pid_t pid = fork();
		if (pid < 0)
			die("fork");
		if (pid == 0) {
			signal(SIGTERM, SIG_DFL);
			signal(SIGINT, SIG_DFL);
			for (int j = 0; j < i; j++) { /* siblings' pipes */
				close(kids[j].to);
				close(kids[j].from);
			}
			close(down[1]);
			close(up[0]);
			child_main(i, down[0], up[1], hb, child_mib,
				   seed ^ ((uint64_t)(i + 1) * 0x9e3779b97f4a7c15ULL) ^ (uint64_t)getpid());
			_exit(0);
		}
		close(down[0]);
		close(up[1]);
		fcntl(up[0], F_SETFL, O_NONBLOCK);
		fcntl(down[1], F_SETFL, O_NONBLOCK);
		kids[i] = (struct child){ .pid = pid, .to = down[1], .from = up[0], .alive = 1, .verdict = -1 };
		nkids++;
	}

	struct buf b;
	buf_init(&b, (size_t)mib, seed);
	snprintf(path, sizeof(path), "%s.state", hb);
	write_state(path, &b);

	/* Wait until every child reported ready ('r'), so that the first heartbeat
	 * means the whole tree is populated. */
	uint64_t t0 = now_ns();
	for (;;) {
		int ready = 0;
		for (int i = 0; i < nkids; i++)
			ready += kids[i].echoes > 0 || !kids[i].alive;
		if (ready == nkids || got_term)
			break;
		if (elapsed_ms_since(t0) > VERIFY_TIMEOUT_MS) {
			fprintf(stderr, "children not ready\n");
			break;
		}
		drain_children(100);
	}

	snprintf(path, sizeof(path), "%s.log", hb);
	int logfd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
	if (logfd < 0)
		die("open %s", path);

	char verify_path[4096];
	snprintf(verify_path, sizeof(verify_path), "%s.verify", hb);
	unsigned long long counter = 0;
	unsigned gen = 0;

	unsigned mutations = 0;
	uint64_t mutate_seed = seed ^ 0x5851f42d4c957f2dULL;
	while (!got_term) {
		if (got_usr2) {
			got_usr2 = 0;
			buf_mutate(&b, &mutate_seed, mutate_pages ? 4096 : 128u << 10);
			/* Its own stream: mutate_seed's continuation is what the next
			 * SIGUSR2 writes, which would then be found in the mapping. */
			if (mutate_insert && !inserted.nwords)
				insert_mapping(&inserted, &b, insert_size,
					       mutate_seed * 0x9e3779b97f4a7c15ULL ^ 0xd1b54a32d192ed03ULL);
			dprintf(logfd, "mutated=%u\n", ++mutations);
		}
		if (got_usr1) {
			got_usr1 = 0;
			gen++;
			for (int i = 0; i < nkids; i++)
				kids[i].verdict = kids[i].alive ? -1 : 0;
			send_all('V');
			uint64_t tv = now_ns();
			for (;;) {
				int pending = 0;
				for (int i = 0; i < nkids; i++)
					pending += kids[i].verdict < 0;
				if (!pending || elapsed_ms_since(tv) > VERIFY_TIMEOUT_MS)
					break;
				drain_children(100);
			}
			int kids_ok = 0;
			for (int i = 0; i < nkids; i++)
				kids_ok += kids[i].verdict == 1;
			snprintf(text, sizeof(text), "children_ok=%d/%d\n", kids_ok, nkids);
			int ok = verify(verify_path, &b, gen, text, kids_ok == nkids);
			dprintf(logfd, "verify gen=%u %s children_ok=%d/%d\n", gen, ok ? "ok" : "BAD", kids_ok, nkids);
		}

		counter++;
		snprintf(text, sizeof(text), "%llu\n", counter);
		write_file(hb, text);
		if (counter % 10 == 0)
			dprintf(logfd, "t=%llu time=%llu children=%d/%d echoes=%lu\n", counter,
				(unsigned long long)(now_ns() / 1000000000u), alive_count(), nkids,
				nkids ? kids[0].echoes : 0UL);

		send_all('p');
		sleep_ms(tick_ms);
		drain_children(0);
	}

	for (int i = 0; i < nkids; i++) {
		kill(kids[i].pid, SIGTERM);
		close(kids[i].to);
	}
	for (int i = 0; i < nkids; i++)
		waitpid(kids[i].pid, NULL, 0);
	dprintf(logfd, "exit t=%llu\n", counter);
	close(logfd);
	return 0;
}
