/* The pipelined, CRC-computing checkpoint writer (see stream_sink.h). */
#define _GNU_SOURCE
#include "stream_sink.h"
#include "safetensors_buf.h" /* sft_write_all: the EINTR- and short-write-proof loop */

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

/* zlib's CRC-32 (hardware-assisted where zlib is), from the runtime library that
 * every Linux system has (setup.py links libz.so.1); its header is optional. */
#if defined(__has_include) && __has_include(<zlib.h>)
#include <zlib.h>
#else
typedef unsigned long uLong;
extern uLong crc32_z(uLong crc, const unsigned char *buf, size_t len);
#endif

/* Write one buffer: with O_DIRECT while the file system takes it (the length and
 * offset are multiples of STREAM_SINK_ALIGN here), else through the page cache.  A
 * direct write refused as a whole (EINVAL: the file system has no O_DIRECT, or
 * wants another alignment) turns direct I/O off for the rest of the file; a short
 * direct write is finished through the page cache. */
static int
write_buffer(StreamSink *s, const unsigned char *data, size_t n, uint64_t off)
{
    pthread_mutex_lock(&s->mu);
    int dfd = s->dfd;
    pthread_mutex_unlock(&s->mu);
    while (dfd >= 0 && n > 0) {
        ssize_t w = pwrite(dfd, data, n, (off_t)off);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w < 0 && errno == EINVAL) {
            pthread_mutex_lock(&s->mu);
            close(s->dfd);
            s->dfd = dfd = -1;
            pthread_mutex_unlock(&s->mu);
            break;
        }
        if (w <= 0) {
            if (w == 0) {
                errno = EIO;
            }
            return -1;
        }
        data += w;
        n -= (size_t)w;
        off += (uint64_t)w;
        if (n % STREAM_SINK_ALIGN != 0) {
            break; /* a short write left an unaligned rest */
        }
    }
    off_t pos = (off_t)off;
    return sft_write_all(s->fd, (const char *)data, n, &pos);
}

static void *
writer_main(void *arg)
{
    StreamSink *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->pending && !s->stop) {
            pthread_cond_wait(&s->cv, &s->mu);
        }
        if (!s->pending) {
            break; /* stop, nothing left */
        }
        int idx = s->pend_idx, skip = s->err != 0;
        size_t len = s->pend_len;
        uint64_t off = s->pend_off;
        pthread_mutex_unlock(&s->mu);
        int err = 0;
        if (!skip && write_buffer(s, s->buf[idx], len, off) < 0) {
            err = errno;
        }
        pthread_mutex_lock(&s->mu);
        if (err != 0 && s->err == 0) {
            s->err = err;
        }
        s->pending = 0;
        pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

int
stream_sink_open(StreamSink *s, const char *path, size_t cap, int direct)
{
    memset(s, 0, sizeof(*s));
    s->fd = s->dfd = -1;
    if (cap == 0 || cap % STREAM_SINK_ALIGN != 0) {
        errno = EINVAL;
        return -1;
    }
    if (pthread_mutex_init(&s->mu, NULL) != 0) {
        errno = ENOMEM;
        return -1;
    }
    if (pthread_cond_init(&s->cv, NULL) != 0) {
        pthread_mutex_destroy(&s->mu);
        errno = ENOMEM;
        return -1;
    }
    s->cap = cap; /* from here on, stream_sink_close undoes what was done */
    for (int i = 0; i < 2; i++) {
        int rc = posix_memalign((void **)&s->buf[i], STREAM_SINK_ALIGN, cap);
        if (rc != 0) {
            s->buf[i] = NULL;
            stream_sink_close(s);
            errno = rc;
            return -1;
        }
    }
    if ((s->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666)) < 0) {
        int err = errno;
        stream_sink_close(s);
        errno = err;
        return -1;
    }
    if (direct) {
        s->dfd = open(path, O_WRONLY | O_DIRECT | O_CLOEXEC); /* -1: no direct I/O here */
    }
    int rc = pthread_create(&s->thread, NULL, writer_main, s);
    if (rc != 0) {
        stream_sink_close(s);
        errno = rc;
        return -1;
    }
    s->running = 1;
    return 0;
}

/* Hand the full buffer to the writer thread (after the one before it is written)
 * and continue in the other.  0, or -1 with the writer's errno. */
static int
hand_over(StreamSink *s)
{
    pthread_mutex_lock(&s->mu);
    while (s->pending) {
        pthread_cond_wait(&s->cv, &s->mu);
    }
    int err = s->err;
    if (err == 0) {
        s->pending = 1;
        s->pend_idx = s->cur;
        s->pend_len = s->fill;
        s->pend_off = s->base;
        pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    if (err != 0) {
        errno = err;
        return -1;
    }
    s->base += s->fill;
    s->cur ^= 1;
    s->fill = 0;
    return 0;
}

int
stream_sink_write(StreamSink *s, const void *data, size_t n, uint32_t *crc)
{
    const unsigned char *p = data;
    uLong c = crc != NULL ? *crc : 0;
    if (!s->running) {
        errno = EBADF;
        return -1;
    }
    while (n > 0) {
        size_t k = s->cap - s->fill < n ? s->cap - s->fill : n;
        unsigned char *dst = s->buf[s->cur] + s->fill;
        memcpy(dst, p, k);
        if (crc != NULL) {
            c = crc32_z(c, dst, k); /* from the copy, still in cache */
        }
        s->fill += k;
        p += k;
        n -= k;
        if (s->fill == s->cap && hand_over(s) < 0) {
            return -1;
        }
    }
    if (crc != NULL) {
        *crc = (uint32_t)c;
    }
    return 0;
}

uint64_t
stream_sink_tell(const StreamSink *s)
{
    return s->base + s->fill;
}

int
stream_sink_is_direct(const StreamSink *s)
{
    pthread_mutex_t *mu = (pthread_mutex_t *)&s->mu;
    pthread_mutex_lock(mu);
    int direct = s->dfd >= 0;
    pthread_mutex_unlock(mu);
    return direct;
}

/* Wait for the writer thread to finish what it has and stop it. */
static void
stop_thread(StreamSink *s)
{
    if (!s->running) {
        return;
    }
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thread, NULL);
    s->running = 0;
}

int
stream_sink_finish(StreamSink *s)
{
    if (!s->running) {
        errno = EBADF;
        return -1;
    }
    stop_thread(s); /* the last full buffer is written before the thread ends */
    if (s->err != 0) {
        errno = s->err;
        return -1;
    }
    uint64_t end = s->base + s->fill;
    if (s->fill > 0) {
        size_t padded = (s->fill + STREAM_SINK_ALIGN - 1) / STREAM_SINK_ALIGN * STREAM_SINK_ALIGN;
        memset(s->buf[s->cur] + s->fill, 0, padded - s->fill);
        /* the tail, padded to the direct-I/O block, then cut back to its length */
        if (write_buffer(s, s->buf[s->cur], s->dfd >= 0 ? padded : s->fill, s->base) < 0) {
            s->err = errno;
            return -1;
        }
    }
    while (ftruncate(s->fd, (off_t)end) < 0) {
        if (errno != EINTR) {
            s->err = errno;
            return -1;
        }
    }
    s->fill = 0;
    s->base = end;
    return 0;
}

void
stream_sink_close(StreamSink *s)
{
    if (s->cap == 0) {
        return; /* zeroed: never opened */
    }
    stop_thread(s);
    if (s->dfd >= 0) {
        close(s->dfd);
    }
    if (s->fd >= 0) {
        close(s->fd);
    }
    s->fd = s->dfd = -1;
    for (int i = 0; i < 2; i++) {
        free(s->buf[i]);
        s->buf[i] = NULL;
    }
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    s->cap = 0;
}

int
stream_sink_direct_wanted(void)
{
    const char *v = getenv("MODELOPT_C_DIRECT_IO");
    return v == NULL || !(strcmp(v, "0") == 0 || strcmp(v, "") == 0 || strcasecmp(v, "no") == 0 ||
                          strcasecmp(v, "false") == 0);
}
