/* A sequential file writer for checkpoints: bytes are copied into two aligned
 * buffers; while the caller fills one (and the CRC-32 of what it wrote is
 * computed), a thread of the sink writes the other.  Where the file system takes
 * it, that thread writes with O_DIRECT: the disk works at its own speed, the page
 * cache is neither filled nor flushed (an fsync after finds nothing left), and a
 * save of many GB does not push the model's own memory out.  Where it does not
 * (tmpfs, some network and FUSE file systems: EINVAL), or when asked, the same
 * pipeline writes through the page cache.
 *
 * Plain C, errno on failure, no Python: callable with the GIL released. */
#ifndef MODELOPT_C_STREAM_SINK_H
#define MODELOPT_C_STREAM_SINK_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

/* Buffer sizes, file offsets and lengths of direct writes are multiples of this. */
#define STREAM_SINK_ALIGN 4096

typedef struct {
    int fd;                   /* the file, opened by the sink */
    int dfd;                  /* the same file opened with O_DIRECT, or -1 */
    unsigned char *buf[2];    /* `cap` bytes each, aligned for O_DIRECT */
    size_t cap;               /* 0: not open (mu and cv exist while it is not 0) */
    int cur;                  /* the buffer being filled */
    size_t fill;              /* bytes in it */
    uint64_t base;            /* file offset of buf[cur][0] */
    /* shared with the writer thread, under mu */
    pthread_t thread;
    int running;              /* the writer thread runs: until finish or close */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int pending;              /* a buffer is handed over and not yet written */
    int pend_idx;
    size_t pend_len;
    uint64_t pend_off;
    int err;                  /* the first errno of a failed write; sticky */
    int stop;
} StreamSink;

/* Open `path` for writing (created 0666 & ~umask, truncated) with buffers of `cap`
 * bytes (a multiple of STREAM_SINK_ALIGN); `direct`: try O_DIRECT.  0, or -1 with errno and
 * nothing left open. */
int stream_sink_open(StreamSink *s, const char *path, size_t cap, int direct);

/* Append `n` bytes; *crc (unless `crc` is NULL) is updated with their CRC-32
 * (zlib's).  0, or -1 with errno (the sink keeps failing after that: call
 * stream_sink_close). */
int stream_sink_write(StreamSink *s, const void *data, size_t n, uint32_t *crc);

/* Bytes appended so far: the file offset of the next write. */
uint64_t stream_sink_tell(const StreamSink *s);

/* Write everything out and stop the thread; the file then has exactly the bytes
 * appended (not yet fsynced).  0, or -1 with errno. */
int stream_sink_finish(StreamSink *s);

/* Stop the thread, close the file and free the buffers; the file stays as it is.
 * Safe on a zeroed, failed, finished or closed sink. */
void stream_sink_close(StreamSink *s);

/* Whether direct I/O is wanted: yes unless MODELOPT_C_DIRECT_IO is 0, no, false or
 * empty (for file systems that take O_DIRECT but do it badly). */
int stream_sink_direct_wanted(void);

/* Whether writes go around the page cache (O_DIRECT) now. */
int stream_sink_is_direct(const StreamSink *s);

#endif
