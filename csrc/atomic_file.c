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
        goto fail;
    }
    f->fd = af->fd;
    if (pthread_mutex_init(&f->mu, NULL) != 0) {
        goto fail;
    }
    have_mu = 1;
    if (pthread_condattr_init(&attr) != 0) {
        goto fail;
    }
    have_attr = 1;
    if (pthread_condattr_setclock(&attr, CLOCK_MONOTONIC) != 0 || pthread_cond_init(&f->wake, &attr) != 0) {
        goto fail;
    }
    have_cv = 1;
    /* the thread takes no signals: they stay with the interpreter's threads */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&f->thread, NULL, flusher_main, f);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        goto fail;
    }
    pthread_condattr_destroy(&attr);
    af->flusher = f;
    errno = saved;
    return;
fail:
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
    if (af->base[0] == '\0' || strlen(af->base) > NAME_MAX - 32) {
        errno = af->base[0] == '\0' ? EISDIR : ENAMETOOLONG;
        return -1;
    }
    return 0;
}

int
atomic_file_open(AtomicFile *af, const char *target)
{
    memset(af, 0, sizeof(*af));
    af->fd = -1;
    if (split_path(af, target) < 0) {
        goto error;
    }
    size_t len = strlen(af->dir) + strlen(af->base) + 64;
    if ((af->tmp = malloc(len)) == NULL) {
        errno = ENOMEM;
        goto error;
    }
    mode_t mode = 0666;
    struct stat sb;
    if (stat(target, &sb) == 0 && S_ISREG(sb.st_mode)) {
        mode = sb.st_mode & 07777; /* a replacement keeps the old file's permissions */
    }
    for (int attempt = 0; af->fd < 0; attempt++) {
        uint64_t rnd = 0;
        if (getrandom(&rnd, sizeof(rnd), GRND_NONBLOCK) != (ssize_t)sizeof(rnd)) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            rnd = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ (uint64_t)attempt;
        }
        snprintf(af->tmp, len, "%s/.%s" TMP_MARK "%ld-%08llx", af->dir, af->base, (long)getpid(),
                 (unsigned long long)(rnd & 0xffffffffULL));
        af->fd = open(af->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
        if (af->fd < 0 && (errno != EEXIST || attempt >= 16)) {
            goto error;
        }
    }
    if (mode != 0666) {
        (void)fchmod(af->fd, mode);
    }
    return 0;
error:;
    int saved = errno;
    free(af->tmp);
    af->tmp = NULL; /* nothing was created */
    atomic_file_close(af);
    errno = saved;
    return -1;
}

/* Remove temp files of earlier writers of this target that no longer run (killed). */
static void
remove_stale_temps(const AtomicFile *af)
{
    char prefix[NAME_MAX + 16];
    int plen = snprintf(prefix, sizeof(prefix), ".%s" TMP_MARK, af->base);
    DIR *d = opendir(af->dir);
    if (d == NULL || plen <= 0 || (size_t)plen >= sizeof(prefix)) {
        if (d != NULL) {
            closedir(d);
        }
        return;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, prefix, (size_t)plen) != 0) {
            continue;
        }
        long pid = strtol(e->d_name + plen, NULL, 10);
        if (pid > 0 && pid != (long)getpid() && kill((pid_t)pid, 0) < 0 && errno == ESRCH) {
            (void)unlinkat(dirfd(d), e->d_name, 0);
        }
    }
    closedir(d);
}

int
atomic_file_commit(AtomicFile *af)
{
    stop_writeback(af);
    if (fsync(af->fd) < 0) {
        return -1;
    }
    int fd = af->fd;
    af->fd = -1;
    if (close(fd) < 0 && errno != EINTR) {
        return -1;
    }
    if (rename(af->tmp, af->target) < 0) {
        return -1;
    }
    free(af->tmp);
    af->tmp = NULL;
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
    remove_stale_temps(af);
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
