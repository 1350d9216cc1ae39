/* Crash-safe replacement of a file: write a temporary file in the target's folder,
 * fsync it, rename it over the target, fsync the folder.  A crash or kill at any
 * point leaves the old file or the new one.  The writer holds an flock on its temp
 * file while it writes; temp files of writers that are gone (killed), for any target,
 * are removed by the next writer into the same folder.  Plain C, errno on failure,
 * no Python: callable with the GIL released. */
#ifndef MODELOPT_C_ATOMIC_FILE_H
#define MODELOPT_C_ATOMIC_FILE_H

typedef struct AtomicFlusher AtomicFlusher;

typedef struct {
    int fd;       /* the temp file, open for writing; -1 when closed */
    char *tmp;    /* its path; NULL once renamed or removed */
    char *target; /* the file it will replace */
    char *dir;    /* the target's folder */
    char *base;   /* the target's name in that folder */
    AtomicFlusher *flusher; /* background writeback, or NULL */
} AtomicFile;

/* Remove the stale temp files in `target`'s folder (see atomic_file.c), then create a
 * fresh, locked temp file beside `target` (mode 0666 & ~umask, or the target's own
 * permission bits when it exists).  0, or -1 with errno set and nothing left behind. */
int atomic_file_open(AtomicFile *af, const char *target);

/* Start background writeback of the temp file: a thread of its own asks the kernel
 * every few tens of milliseconds to begin writing out what has been written so far
 * (sync_file_range, without waiting), so the disk works while the producer still
 * computes, and the final fsync finds little left.  Writes may come through any
 * descriptor of the temp file (torch.save opens its own).  Best effort: if the
 * thread cannot start, everything is simply written back at fsync.  Stopped by
 * commit and close. */
void atomic_file_start_writeback(AtomicFile *af);

/* fsync the temp file, rename it over the target, fsync the folder.  0, or -1 with
 * errno (then call atomic_file_close). */
int atomic_file_commit(AtomicFile *af);

/* Close the temp file and remove it if it was not committed; free everything.
 * Safe to call on a zeroed, failed or committed AtomicFile. */
void atomic_file_close(AtomicFile *af);

#endif
