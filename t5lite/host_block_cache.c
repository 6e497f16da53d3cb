// t5lite's host block cache: an LD_PRELOAD layer over the process's malloc (mimalloc, glibc)
// that keeps large freed buffers, already faulted in, for the next request of their size.
//
// XLA:CPU allocates each execution's temporaries as one large buffer (T5-small at b8 x (256 +
// 64): 1.37 GB) and frees it after the step, from another thread and a little after the step's
// outputs are ready, so the next step's buffer is sometimes asked for before the last one is
// back. mimalloc then maps fresh memory for it, and it did so again and again (1-3 of every 14
// steps faulted 360,000 pages back in; in a VM each fault cost up to 45 us, and such a step took
// 8-17 s instead of 4). See t5lite/host_malloc.py.
//
// Requests of at least kThreshold bytes are served from one reservation of address space, cut
// into 2 MiB-aligned segments: a freed block is kept as it is (its pages resident), and the
// next large request takes the smallest kept block that holds it and is at most twice its
// size, else fresh space. Before it takes fresh space, kept bytes above a limit
// ($T5LITE_HOST_CACHE_MB, default a quarter of physical memory; 0 turns the cache off) are
// returned to the kernel, least recently freed first. Everything else, and every request the
// reservation cannot serve, goes to the next allocator. free() tells our blocks by address,
// with no lock.
//
// The first time a block is taken again (its size recurs, as a step buffer's does) and it is
// the only block of its size, the cache also faults in a spare of that size and keeps it, where
// the limit allows: the overlap above then finds the spare rather than fresh space. Without it
// the overlap came once a process, at a step of its own choosing (T5-small: 368,598 and 372,037
// faults, steps of 4.5 and 5.4 s in place of ~3.4, the 4th and 6th of 6 timed steps); with it
// the cost falls on the second step, while the program warms up, and is smaller (the kernel
// faults the pages in one call, MADV_POPULATE_WRITE, rather than one fault at a time).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

static const size_t kThreshold = (size_t)16 << 20;  // smallest request served here
static const size_t kUnit = (size_t)2 << 20;        // blocks start and end on 2 MiB
enum { kMaxSegments = 1024 };

typedef struct {
  size_t offset, bytes;
  int live, dirty;  // dirty: free, with pages that may be resident (they are not zero)
  uint64_t used;    // when it was last freed, for eviction
} Segment;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static Segment segs[kMaxSegments];  // sorted by offset, covering [0, top)
static int nsegs;
static size_t top, cached, limit;  // cached: bytes of dirty free segments
static uint64_t tick;
static int disabled;  // no reservation, or a limit of 0
static _Atomic(uintptr_t) base;
static _Atomic(size_t) span;

static void* (*next_malloc)(size_t);
static void (*next_free)(void*);
static void* (*next_calloc)(size_t, size_t);
static void* (*next_realloc)(void*, size_t);
static int (*next_posix_memalign)(void**, size_t, size_t);
static void* (*next_aligned_alloc)(size_t, size_t);
static void* (*next_memalign)(size_t, size_t);
static void* (*next_valloc)(size_t);
static void* (*next_pvalloc)(size_t);
static size_t (*next_malloc_usable_size)(void*);

// dlsym may allocate while the next allocator's functions are being looked up.
static char boot[1 << 16] __attribute__((aligned(64)));
static size_t boot_used;
static int resolving;

static void* boot_alloc(size_t n) {
  n = (n + 63) & ~(size_t)63;
  if (n > sizeof(boot) - boot_used) return NULL;
  void* p = boot + boot_used;
  boot_used += n;
  return p;
}

static int in_boot(const void* p) {
  return (const char*)p >= boot && (const char*)p < boot + sizeof(boot);
}

static void die(const char* message) {
  ssize_t ignored = write(2, message, strlen(message));
  (void)ignored;
  abort();
}

static void lock(void) { pthread_mutex_lock(&mu); }
static void unlock(void) { pthread_mutex_unlock(&mu); }

static void resolve(void) {
  if (next_malloc) return;
  resolving = 1;
  next_free = dlsym(RTLD_NEXT, "free");
  next_calloc = dlsym(RTLD_NEXT, "calloc");
  next_realloc = dlsym(RTLD_NEXT, "realloc");
  next_posix_memalign = dlsym(RTLD_NEXT, "posix_memalign");
  next_aligned_alloc = dlsym(RTLD_NEXT, "aligned_alloc");
  next_memalign = dlsym(RTLD_NEXT, "memalign");
  next_valloc = dlsym(RTLD_NEXT, "valloc");
  next_pvalloc = dlsym(RTLD_NEXT, "pvalloc");
  next_malloc_usable_size = dlsym(RTLD_NEXT, "malloc_usable_size");
  void* (*found)(size_t) = dlsym(RTLD_NEXT, "malloc");
  if (!found || !next_free || !next_calloc || !next_realloc || !next_posix_memalign)
    die("t5lite host block cache: no allocator after it to forward to\n");
  const char* mb = getenv("T5LITE_HOST_CACHE_MB");
  if (mb && *mb) {
    char* end;
    unsigned long long value = strtoull(mb, &end, 10);
    limit = *end ? 0 : (size_t)value << 20;
  } else {
    limit = (size_t)sysconf(_SC_PHYS_PAGES) * (size_t)sysconf(_SC_PAGESIZE) / 4;
  }
  disabled = limit == 0;
  next_malloc = found;
  resolving = 0;
}

static void prepare_fork(void) { lock(); }

__attribute__((constructor)) static void init(void) {
  resolve();
  pthread_atfork(prepare_fork, unlock, unlock);
}

// Reserves the address space blocks are cut from, once. Called with the lock held.
static int reserve(void) {
  if (atomic_load_explicit(&base, memory_order_relaxed)) return 1;
  if (disabled) return 0;
  for (size_t bytes = (size_t)1 << 40; bytes >= (size_t)1 << 34; bytes >>= 1) {
    void* p = mmap(NULL, bytes + kUnit, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) continue;
    uintptr_t start = ((uintptr_t)p + kUnit - 1) & ~(uintptr_t)(kUnit - 1);
    // Huge pages would be faulted once anyway; the kernel's compaction for them is not.
    madvise((void*)start, bytes, MADV_NOHUGEPAGE);
    atomic_store_explicit(&span, bytes, memory_order_release);
    atomic_store_explicit(&base, start, memory_order_release);
    return 1;
  }
  disabled = 1;
  return 0;
}

static int ours(const void* p) {
  uintptr_t b = atomic_load_explicit(&base, memory_order_acquire);
  return b && (uintptr_t)p - b < atomic_load_explicit(&span, memory_order_acquire);
}

static int insert(int at, Segment s) {  // the lock held
  if (nsegs == kMaxSegments) return 0;
  memmove(&segs[at + 1], &segs[at], (size_t)(nsegs - at) * sizeof(Segment));
  segs[at] = s;
  ++nsegs;
  return 1;
}

static void erase(int at) {  // the lock held
  memmove(&segs[at], &segs[at + 1], (size_t)(nsegs - at - 1) * sizeof(Segment));
  --nsegs;
}

// The free segment that best serves `need` bytes, or -1: with `kept`, the smallest kept
// (resident) block that holds it and is at most twice its size; else the smallest fresh one.
static int find(size_t need, int kept) {  // the lock held
  int best = -1;
  for (int i = 0; i < nsegs; ++i) {
    const Segment* s = &segs[i];
    if (!s->live && s->dirty == kept && s->bytes >= need && (!kept || s->bytes / 2 <= need) &&
        (best < 0 || s->bytes < segs[best].bytes))
      best = i;
  }
  return best;
}

// Returns kept blocks to the kernel, least recently freed first, until at most `limit` bytes
// are kept, and merges neighbouring fresh segments. Called only when the cache is about to take
// fresh space, so resident memory stays under the limit plus the most ever in use at once, and
// blocks that keep being reused are never returned (evicting at free() did that: two
// overlapping 4.45 GB step buffers over a 6 GB limit were faulted in again every step).
static void evict(void) {  // the lock held
  while (cached > limit) {
    int oldest = -1;
    for (int j = 0; j < nsegs; ++j) {
      if (!segs[j].live && segs[j].dirty && (oldest < 0 || segs[j].used < segs[oldest].used))
        oldest = j;
    }
    if (oldest < 0) break;
    madvise((void*)(atomic_load_explicit(&base, memory_order_relaxed) + segs[oldest].offset),
            segs[oldest].bytes, MADV_DONTNEED);
    segs[oldest].dirty = 0;
    cached -= segs[oldest].bytes;
  }
  for (int j = 0; j + 1 < nsegs;) {
    Segment* a = &segs[j];
    if (!a->live && !a->dirty && !segs[j + 1].live && !segs[j + 1].dirty) {
      a->bytes += segs[j + 1].bytes;
      erase(j + 1);
    } else {
      ++j;
    }
  }
}

// A fresh (never touched, or returned to the kernel) free segment of at least `need` bytes, cut
// to `need`, or -1: the smallest free one, else new space at the top (taking in a fresh free
// segment that ends there).
static int fresh(size_t need) {  // the lock held
  int best = find(need, 0);
  if (best < 0) {
    int extend = nsegs > 0 && !segs[nsegs - 1].live && !segs[nsegs - 1].dirty;
    size_t start = extend ? segs[nsegs - 1].offset : top;
    if (start + need > atomic_load_explicit(&span, memory_order_relaxed) ||
        (!extend && !insert(nsegs, (Segment){start, 0, 0, 0, 0})))
      return -1;
    best = nsegs - 1;
    segs[best].bytes = need;
    top = start + need;
  }
  if (segs[best].bytes > need) {  // the rest stays free (without a slot, all is taken)
    Segment rest = {segs[best].offset + need, segs[best].bytes - need, 0, 0, 0};
    if (insert(best + 1, rest)) segs[best].bytes = need;
  }
  return best;
}

// Whether segs[i] is the only block, in use or kept, of its size.
static int only_of_its_size(int i) {  // the lock held
  for (int j = 0; j < nsegs; ++j) {
    if (j != i && (segs[j].live || segs[j].dirty) && segs[j].bytes == segs[i].bytes) return 0;
  }
  return 1;
}

// Faults in [p, p + bytes) in one call where the kernel can (Linux 5.14), else a write a page
// where it does not know the call (not where memory ran short), keeping the caller's errno.
static void populate(char* p, size_t bytes) {
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
  int saved = errno;
  if (madvise(p, bytes, MADV_POPULATE_WRITE) != 0 && errno == EINVAL) {
    for (size_t i = 0; i < bytes; i += 4096) ((volatile char*)p)[i] = 0;
  }
  errno = saved;
}

static void give_back(void* p);

// A block of at least `size` bytes from the reservation, or NULL; *dirty says whether it may
// hold old data. A kept block is taken whole, and only for a request of at least half its size:
// kept blocks are never split or merged, so each stays whole for the request it was kept for
// (merged with a small neighbour, a kept step buffer would be passed over by the small
// requests and take fresh space for each). Fresh space (never touched, or returned to the
// kernel) is split and merged.
static void* take(size_t size, int* dirty) {
  if (size > ((size_t)1 << 40)) return NULL;
  size_t need = (size + kUnit - 1) & ~(kUnit - 1);
  lock();
  if (!reserve()) {
    unlock();
    return NULL;
  }
  int best = find(need, 1);
  if (best < 0) {
    evict();
    best = fresh(need);
    if (best < 0) {
      unlock();
      return NULL;
    }
  }
  Segment* s = &segs[best];
  if (s->dirty) cached -= s->bytes;
  *dirty = s->dirty;
  s->live = 1;
  s->dirty = 0;
  uintptr_t at = atomic_load_explicit(&base, memory_order_relaxed);
  void* p = (void*)(at + s->offset);
  char* spare = NULL;  // taken as in use (so no one takes it) and faulted in outside the lock
  size_t spare_bytes = s->bytes;
  if (*dirty && only_of_its_size(best) && cached + spare_bytes <= limit) {
    int i = fresh(spare_bytes);
    if (i >= 0) {
      segs[i].live = 1;
      spare = (char*)(at + segs[i].offset);
    }
  }
  unlock();
  if (spare) {
    populate(spare, spare_bytes);
    give_back(spare);  // kept, resident, for the next request of this size
  }
  return p;
}

// Frees a block from `take`, keeping its pages (the limit applies when fresh space is next
// taken, in evict()).
static void give_back(void* p) {
  size_t offset = (uintptr_t)p - atomic_load_explicit(&base, memory_order_relaxed);
  lock();
  int i = 0;
  while (i < nsegs && segs[i].offset < offset) ++i;
  if (i == nsegs || segs[i].offset != offset || !segs[i].live)
    die("t5lite host block cache: free() of a pointer it did not allocate\n");
  segs[i].live = 0;
  segs[i].dirty = 1;
  segs[i].used = ++tick;
  cached += segs[i].bytes;
  unlock();
}

static size_t block_size(const void* p) {
  size_t offset = (uintptr_t)p - atomic_load_explicit(&base, memory_order_relaxed), bytes = 0;
  lock();
  for (int i = 0; i < nsegs; ++i) {
    if (segs[i].offset == offset && segs[i].live) bytes = segs[i].bytes;
  }
  unlock();
  return bytes;
}

static void* big(size_t size, int zero) {
  int dirty = 0;
  void* p = take(size, &dirty);
  if (p && zero && dirty) memset(p, 0, size);
  return p;
}

// A block from the reservation for a large request whose alignment it meets (any power of two
// up to 2 MiB, which every block has), or NULL.
static void* big_aligned(size_t alignment, size_t size) {
  if (size < kThreshold || !alignment || (alignment & (alignment - 1)) || alignment > kUnit)
    return NULL;
  return big(size, 0);
}

EXPORT void* malloc(size_t size) {
  if (!next_malloc) {
    if (resolving) return boot_alloc(size);
    resolve();
  }
  void* p = big_aligned(kUnit, size);
  return p ? p : next_malloc(size);
}

EXPORT void free(void* p) {
  if (!p || in_boot(p)) return;
  if (ours(p)) {
    give_back(p);
    return;
  }
  if (!next_free) resolve();
  next_free(p);
}

EXPORT void* calloc(size_t count, size_t size) {
  if (!next_calloc) {
    if (resolving) return boot_alloc(count * size);
    resolve();
  }
  size_t total;
  if (__builtin_mul_overflow(count, size, &total)) {
    errno = ENOMEM;
    return NULL;
  }
  if (total >= kThreshold) {
    void* p = big(total, 1);
    if (p) return p;
  }
  return next_calloc(count, size);
}

EXPORT void* realloc(void* p, size_t size) {
  if (!p) return malloc(size);
  if (in_boot(p)) {
    size_t held = (size_t)(boot + sizeof(boot) - (char*)p);
    void* moved = malloc(size);
    if (moved) memcpy(moved, p, size < held ? size : held);
    return moved;
  }
  if (!ours(p)) {
    if (!next_realloc) resolve();
    return next_realloc(p, size);
  }
  size_t bytes = block_size(p);
  if (size <= bytes) return p;
  void* moved = malloc(size);
  if (!moved) return NULL;
  memcpy(moved, p, bytes);
  give_back(p);
  return moved;
}

EXPORT void* reallocarray(void* p, size_t count, size_t size) {
  size_t total;
  if (__builtin_mul_overflow(count, size, &total)) {
    errno = ENOMEM;
    return NULL;
  }
  return realloc(p, total);
}

EXPORT int posix_memalign(void** out, size_t alignment, size_t size) {
  if (!next_posix_memalign) resolve();
  void* p = alignment % sizeof(void*) ? NULL : big_aligned(alignment, size);
  if (!p) return next_posix_memalign(out, alignment, size);
  *out = p;
  return 0;
}

EXPORT void* aligned_alloc(size_t alignment, size_t size) {
  if (!next_aligned_alloc) resolve();
  void* p = big_aligned(alignment, size);
  return p ? p : next_aligned_alloc(alignment, size);
}

EXPORT void* memalign(size_t alignment, size_t size) {
  if (!next_memalign) resolve();
  void* p = big_aligned(alignment, size);
  return p ? p : next_memalign(alignment, size);
}

EXPORT void* valloc(size_t size) {
  if (!next_valloc) resolve();
  void* p = big_aligned(kUnit, size);
  return p ? p : next_valloc(size);
}

EXPORT void* pvalloc(size_t size) {
  if (!next_pvalloc) resolve();
  void* p = big_aligned(kUnit, size);
  return p ? p : next_pvalloc(size);
}

EXPORT size_t malloc_usable_size(void* p) {
  if (!p || in_boot(p)) return 0;
  if (ours(p)) return block_size(p);
  if (!next_malloc_usable_size) resolve();
  return next_malloc_usable_size ? next_malloc_usable_size(p) : 0;
}

// C23's sized frees, where the C library has them.
EXPORT void free_sized(void* p, size_t size) {
  (void)size;
  free(p);
}

EXPORT void free_aligned_sized(void* p, size_t alignment, size_t size) {
  (void)alignment;
  (void)size;
  free(p);
}

// Bytes of freed blocks kept resident, for tests and diagnostics.
EXPORT size_t t5lite_host_block_cache_kept(void) {
  lock();
  size_t bytes = cached;
  unlock();
  return bytes;
}
