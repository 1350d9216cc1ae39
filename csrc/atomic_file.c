/* Crash-safe file replacement, shared by both checkpoint writers (see atomic_file.h). */
#define _GNU_SOURCE
#include "atomic_file.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define TMP_MARK ".tmp-"
#define WRITEBACK_PERIOD_NS (40 * 1000 * 1000L)

/* ---- background writeback -------------------------------------------------------- */

struct AtomicFlusher {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t wake;
    int stop; /* under mu */
    int fd;
};

static void *
flusher_main(void *arg)
{
    AtomicFlusher *f = arg;
    pthread_mutex_lock(&f->mu);
    while (!f->stop) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_nsec += WRITEBACK_PERIOD_NS;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec += 1;
            until.tv_nsec -= 1000000000L;
        }
        (void)pthread_cond_timedwait(&f->wake, &f->mu, &until);
        if (f->stop) {
            break;
        }
        pthread_mutex_unlock(&f->mu);
        /* start write-out of dirty pages not already under write-out; no waiting */
        (void)sync_file_range(f->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
        pthread_mutex_lock(&f->mu);
    }
    pthread_mutex_unlock(&f->mu);
    return NULL;
}

void
atomic_file_start_writeback(AtomicFile *af)
{
    if (af->fd < 0 || af->flusher != NULL) {
        return;
    }
    int saved = errno;
    AtomicFlusher *f = calloc(1, sizeof(*f));
    pthread_condattr_t attr;
    int have_attr = 0, have_mu = 0, have_cv = 0;
    if (f == NULL) {
        goto undo;
    }
    f->fd = af->fd;
    if (pthread_mutex_init(&f->mu, NULL) != 0) {
        goto undo;
    }
    have_mu = 1;
    if (pthread_condattr_init(&attr) != 0) {
        goto undo;
    }
    have_attr = 1;
    if (pthread_condattr_setclock(&attr, CLOCK_MONOTONIC) != 0 || pthread_cond_init(&f->wake, &attr) != 0) {
        goto undo;
    }
    have_cv = 1;
    /* the thread takes no signals: they stay with the interpreter's threads */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&f->thread, NULL, flusher_main, f);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        goto undo;
    }
    pthread_condattr_destroy(&attr);
    af->flusher = f;
    errno = saved;
    return;
undo:
    if (have_cv) {
        pthread_cond_destroy(&f->wake);
    }
    if (have_attr) {
        pthread_condattr_destroy(&attr);
    }
    if (have_mu) {
        pthread_mutex_destroy(&f->mu);
    }
    free(f);
    errno = saved;
}

static void
stop_writeback(AtomicFile *af)
{
    AtomicFlusher *f = af->flusher;
    if (f == NULL) {
        return;
    }
    pthread_mutex_lock(&f->mu);
    f->stop = 1;
    pthread_cond_signal(&f->wake);
    pthread_mutex_unlock(&f->mu);
    pthread_join(f->thread, NULL);
    pthread_cond_destroy(&f->wake);
    pthread_mutex_destroy(&f->mu);
    free(f);
    af->flusher = NULL;
}

/* ---- the temp file ---------------------------------------------------------------- */

/* Temp files are named ".<target name>.tmp-<pid>-<start>-<16 hex>": the writer's pid,
 * its start time (clock ticks since boot, from /proc/<pid>/stat; 0 when unknown) so
 * that a reused pid is told apart, and a random part.  The writer holds an exclusive
 * flock on its temp file from creation to rename.  A temp file is stale -- its writer
 * is gone -- when nobody holds its lock and its writer (pid and start time) no longer
 * runs; every writer removes the stale temp files of the folder, whatever their
 * target, before it creates its own.  Creation and the removal scan are serialised
 * by an flock on the folder (shared while creating and locking a temp file,
 * exclusive while scanning), so a scan never sees a temp file before its lock.
 * Older writers named theirs ".<name>.tmp-<pid>-<8 hex>" and took no lock: those
 * are stale when their pid no longer runs. */

static unsigned long long
process_start_time(long pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return 0;
    }
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0) {
        return 0;
    }
    buf[n] = '\0';
    /* "pid (comm) state ppid ..."; comm may hold spaces and ')': skip past the last ')' */
    char *p = strrchr(buf, ')');
    if (p == NULL) {
        return 0;
    }
    p++;
    /* after comm: field 3 (state) ... field 22 (starttime): 20 fields on */
    for (int field = 3; field < 22 && *p != '\0'; field++) {
        while (*p == ' ') {
            p++;
        }
        while (*p != ' ' && *p != '\0') {
            p++;
        }
    }
    return strtoull(p, NULL, 10);
}

/* Whether the process that wrote a temp file still runs (conservative: yes when unsure). */
static int
writer_alive(long pid, unsigned long long start)
{
    if (pid <= 0) {
        return 1;
    }
    if (kill((pid_t)pid, 0) < 0 && errno == ESRCH) {
        return 0;
    }
    if (start != 0) {
        unsigned long long now = process_start_time(pid);
        if (now != 0 && now != start) {
            return 0; /* the pid now belongs to another process */
        }
    }
    return 1;
}

static int
all_of(const char *s, size_t n, const char *set)
{
    if (n == 0) {
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        if (strchr(set, s[i]) == NULL || s[i] == '\0') {
            return 0;
        }
    }
    return 1;
}

/* Parse a temp file's name: 2 for ours (locked while written), 1 for an older
 * writer's (no lock), 0 for anything else. */
static int
parse_temp_name(const char *name, long *pid, unsigned long long *start)
{
    static const char dec[] = "0123456789", hex[] = "0123456789abcdef";
    if (name[0] != '.') {
        return 0;
    }
    const char *mark = NULL;
    for (const char *m = strstr(name + 1, TMP_MARK); m != NULL; m = strstr(m + 1, TMP_MARK)) {
        mark = m; /* the last one: a target's own name may hold the mark */
    }
    if (mark == NULL || mark == name + 1) {
        return 0;
    }
    const char *f1 = mark + strlen(TMP_MARK);
    const char *d1 = strchr(f1, '-');
    if (d1 == NULL || !all_of(f1, (size_t)(d1 - f1), dec) || d1 - f1 > 10) {
        return 0;
    }
    *pid = strtol(f1, NULL, 10);
    const char *f2 = d1 + 1;
    const char *d2 = strchr(f2, '-');
    if (d2 == NULL) {
        *start = 0;
        return strlen(f2) == 8 && all_of(f2, 8, hex) ? 1 : 0;
    }
    if (!all_of(f2, (size_t)(d2 - f2), dec) || d2 - f2 > 20 || strlen(d2 + 1) != 16 || !all_of(d2 + 1, 16, hex)) {
        return 0;
    }
    *start = strtoull(f2, NULL, 10);
    return 2;
}

/* Remove the temp files in the folder `dfd` whose writers are gone (see above). */
static void
remove_stale_temps(int dfd)
{
    int dup_fd = fcntl(dfd, F_DUPFD_CLOEXEC, 0);
    DIR *d = dup_fd >= 0 ? fdopendir(dup_fd) : NULL;
    if (d == NULL) {
        if (dup_fd >= 0) {
            close(dup_fd);
        }
        return;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        long pid = 0;
        unsigned long long start = 0;
        int kind = parse_temp_name(e->d_name, &pid, &start);
        if (kind == 0) {
            continue;
        }
        int fd = openat(dfd, e->d_name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0) {
            continue;
        }
        struct stat sb;
        int stale = 0;
        if (fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode)) {
            if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
                stale = !writer_alive(pid, start); /* unlocked: its writer is gone, or never locked */
            }
            else if (errno != EWOULDBLOCK && errno != EINTR) {
                stale = !writer_alive(pid, start); /* no flock on this file system: the pid decides */
            }
        }
        if (stale) {
            (void)unlinkat(dfd, e->d_name, 0);
        }
        close(fd); /* drops our lock */
    }
    closedir(d);
}

/* Take the folder's lock: exclusive (1) when free, then scanning is safe; else shared
 * (0); -1 when the file system has no flock (or a holder never lets go). */
static int
lock_folder(int dfd)
{
    if (flock(dfd, LOCK_EX | LOCK_NB) == 0) {
        return 1;
    }
    if (errno != EWOULDBLOCK) {
        return -1;
    }
    /* a scan or creations under way: they take milliseconds; wait up to ~2 s */
    for (int i = 0; i < 2000; i++) {
        if (flock(dfd, LOCK_SH | LOCK_NB) == 0) {
            return 0;
        }
        if (errno != EWOULDBLOCK) {
            return -1;
        }
        struct timespec ms = {0, 1000 * 1000L};
        nanosleep(&ms, NULL);
    }
    return -1;
}

static int
split_path(AtomicFile *af, const char *target)
{
    const char *slash = strrchr(target, '/');
    af->target = strdup(target);
    if (slash == NULL) {
        af->dir = strdup(".");
        af->base = strdup(target);
    }
    else {
        af->dir = strndup(target, slash == target ? 1 : (size_t)(slash - target));
        af->base = strdup(slash + 1);
    }
    if (af->target == NULL || af->dir == NULL || af->base == NULL) {
        errno = ENOMEM;
        return -1;
    }
    if (af->base[0] == '\0' || strlen(af->base) > NAME_MAX - 64) {
        errno = af->base[0] == '\0' ? EISDIR : ENAMETOOLONG;
        return -1;
    }
    return 0;
}

int
atomic_file_open(AtomicFile *af, const char *target)
{
    int dfd = -1;
    memset(af, 0, sizeof(*af));
    af->fd = -1;
    if (split_path(af, target) < 0) {
        goto error;
    }
    size_t len = strlen(af->dir) + strlen(af->base) + 96;
    if ((af->tmp = malloc(len)) == NULL) {
        errno = ENOMEM;
        goto error;
    }
    mode_t mode = 0666;
    struct stat sb;
    if (stat(target, &sb) == 0 && S_ISREG(sb.st_mode)) {
        mode = sb.st_mode & 07777; /* a replacement keeps the old file's permissions */
    }
    if ((dfd = open(af->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
        goto error;
    }
    int folder = lock_folder(dfd);
    if (folder == 1) {
        remove_stale_temps(dfd); /* frees space before we take some */
        (void)flock(dfd, LOCK_SH);
    }
    else if (folder < 0) {
        remove_stale_temps(dfd); /* no folder lock: temp locks and pids still decide */
    }
    unsigned long long start = process_start_time((long)getpid());
    for (int attempt = 0; af->fd < 0; attempt++) {
        uint64_t rnd = 0;
        if (getrandom(&rnd, sizeof(rnd), GRND_NONBLOCK) != (ssize_t)sizeof(rnd)) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            rnd = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ ((uint64_t)attempt << 56);
        }
        snprintf(af->tmp, len, "%s/.%s" TMP_MARK "%ld-%llu-%016llx", af->dir, af->base, (long)getpid(), start,
                 (unsigned long long)rnd);
        af->fd = open(af->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
        if (af->fd < 0 && (errno != EEXIST || attempt >= 16)) {
            goto error;
        }
    }
    (void)flock(af->fd, LOCK_EX | LOCK_NB); /* held until the rename (none on some file systems) */
    close(dfd); /* releases the folder's lock */
    dfd = -1;
    if (mode != 0666) {
        (void)fchmod(af->fd, mode);
    }
    return 0;
error:;
    int saved = errno;
    if (dfd >= 0) {
        close(dfd);
    }
    free(af->tmp);
    af->tmp = NULL; /* nothing was created */
    atomic_file_close(af);
    errno = saved;
    return -1;
}

int
atomic_file_commit(AtomicFile *af)
{
    stop_writeback(af);
    if (fsync(af->fd) < 0) {
        return -1;
    }
    /* renamed while still open, so its lock stays held until it has its final name */
    if (rename(af->tmp, af->target) < 0) {
        return -1;
    }
    free(af->tmp);
    af->tmp = NULL;
    int fd = af->fd;
    af->fd = -1;
    if (close(fd) < 0 && errno != EINTR) {
        return -1;
    }
    /* make the rename itself durable; some file systems cannot fsync a folder */
    int dfd = open(af->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        int rc = fsync(dfd);
        int saved = errno;
        close(dfd);
        if (rc < 0 && saved != EINVAL && saved != ENOTSUP) {
            errno = saved;
            return -1;
        }
    }
    return 0;
}

void
atomic_file_close(AtomicFile *af)
{
    int saved = errno;
    stop_writeback(af);
    if (af->fd >= 0) {
        close(af->fd);
        af->fd = -1;
    }
    if (af->tmp != NULL) {
        (void)unlink(af->tmp);
        free(af->tmp);
        af->tmp = NULL;
    }
    free(af->target);
    free(af->dir);
    free(af->base);
    af->target = af->dir = af->base = NULL;
    errno = saved;
}
