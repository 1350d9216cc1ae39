/* Crash-safe file replacement, shared by both checkpoint writers (see atomic_file.h). */
#define _GNU_SOURCE
#include "atomic_file.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
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
