/* trainsup-shim: the small parent of one job process, so that the daemon can die, be
 * killed or re-execute itself without costing the job anything (as conmon, runit's
 * runsv and slurmstepd do for their children).
 *
 * It holds the two things a job needs from its parent while no daemon runs:
 *   - its output: the job's stdout and stderr are a pipe this shim reads and appends to
 *     the job's log file itself (rotated by size, as the daemon did), so the job never
 *     blocks on a full pipe or gets EPIPE because no daemon is reading, and a chatty job
 *     costs the daemon nothing;
 *   - its exit status: reaped here, written with the time to STATUS (tmp + rename, so a
 *     reader sees all of it or nothing) before the shim exits. The daemon that launched
 *     it, or the next one, reads it when the shim's pidfd says it has gone. No fsync: the
 *     file must outlive the daemon's process (the page cache does), and a machine that
 *     goes down takes the job with it; the state database is written the same way.
 *
 * It never returns to the daemon and holds nothing of it: it is exec'd (born in the
 * launch's cgroup by clone3), starts the job with vfork + execve, and then only polls
 * the pipe and a signalfd. A few hundred KB of resident memory, most of it shared.
 *
 * usage: trainsup-shim MARKER STATUS LOG LOG_MAX_BYTES LOG_BACKUPS CWD UID GID GROUPS
 *                      NEXEC EXEC... -- ARGV...
 *   MARKER  <tree>/<job>.<attempt>: how a restarted daemon tells its shims (argv[1])
 *   GROUPS  comma-separated supplementary gids, or "-"; UID/GID -1: no change of user
 *   EXEC    the paths to try for ARGV[0] (the daemon resolved PATH), in order
 * The environment is the job's. fd 0 is the job's stdin (/dev/null); fd 1 is a pipe to
 * the daemon that gets one 16-byte start report: {magic, stage, errno, pid}. stage 0:
 * the job was exec'd as pid; else it failed at that stage (1 stdio, 2 workdir, 3 setsid,
 * 4 user, 5 exec, 6 the shim's own setup) with errno, and the shim exits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#define T_CLOSE_RANGE_CLOEXEC (1U << 2)
#define REPORT_MAGIC 0x4d485354 /* "TSHM" */
#define MAX_GROUPS 4096
/* After the job's exit, what its descendants still write is read for at most this many
 * chunks: one that keeps the pipe full must not keep the exit from being reported. */
#define DRAIN_CHUNKS 64

static const char *log_path;
static long long log_max;
static int log_backups;
static int log_fd = -1;
static long long log_size;
static unsigned long long lost_bytes;
static int lost_errno;
static char buf[65536];

static void log_open(void) {
    struct stat st;
    log_fd = open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    log_size = (log_fd >= 0 && fstat(log_fd, &st) == 0) ? (long long)st.st_size : 0;
}

/* The daemon's rule: LOG -> LOG.1 -> ... -> LOG.<backups>, the oldest dropped. */
static void log_rotate(void) {
    char src[PATH_MAX + 24], dst[PATH_MAX + 24];
    close(log_fd);
    log_fd = -1;
    for (int i = log_backups; i >= 1; i--) {
        if (i == 1)
            snprintf(src, sizeof src, "%s", log_path);
        else
            snprintf(src, sizeof src, "%s.%d", log_path, i - 1);
        snprintf(dst, sizeof dst, "%s.%d", log_path, i);
        rename(src, dst);
    }
    if (log_backups == 0)
        unlink(log_path);
    log_open();
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
        log_size += w;
    }
    return 0;
}

/* Append to the log; a failing disk drops output (counted, said once it works again),
 * never blocks the reading of the job's pipe. */
static void log_write(const char *p, size_t n) {
    if (log_fd < 0)
        log_open();
    if (log_fd >= 0 && log_size > 0 && log_size + (long long)n > log_max) {
        struct stat st;   /* the daemon's own notes count too: the file's size decides */
        if (fstat(log_fd, &st) == 0)
            log_size = st.st_size;
        if (log_size + (long long)n > log_max)
            log_rotate();
    }
    if (log_fd < 0) {
        lost_errno = errno;
        lost_bytes += n;
        return;
    }
    if (lost_bytes) {
        char note[256];
        int len = snprintf(note, sizeof note, "[trainsup] %llu bytes of the job's output were lost: %s\n",
                           lost_bytes, strerror(lost_errno));
        if (write_all(log_fd, note, (size_t)len) == 0)
            lost_bytes = 0;
    }
    if (write_all(log_fd, p, n) < 0) {
        lost_errno = errno;
        lost_bytes += n;
        close(log_fd);
        log_fd = -1;
    }
}

struct report {
    int32_t magic, stage, err, pid;
};

static void send_report(int fd, int stage, int err, int pid) {
    struct report r = {REPORT_MAGIC, stage, err, pid};
    ssize_t w;
    do {
        w = write(fd, &r, sizeof r);
    } while (w < 0 && errno == EINTR);
}

static long parse_long(const char *s, int *ok) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end != '\0')
        *ok = 0;
    return v;
}

static int write_status(const char *path, pid_t pid, int status, const struct timespec *at) {
    char tmp[PATH_MAX + 8];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return -1;
    int ok = dprintf(fd, "trainsup-exit 1\npid %d\nstatus %d\nat %lld.%09ld\n", (int)pid, status,
                     (long long)at->tv_sec, at->tv_nsec) > 0;
    ok = close(fd) == 0 && ok;
    if (!ok || rename(tmp, path) < 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    int ok = 1;
    if (argc < 12) {
        send_report(1, 6, EINVAL, 0);
        return 2;
    }
    const char *status_path = argv[2];
    log_path = argv[3];
    log_max = parse_long(argv[4], &ok);
    log_backups = (int)parse_long(argv[5], &ok);
    const char *cwd = argv[6];
    long uid = parse_long(argv[7], &ok), gid = parse_long(argv[8], &ok);
    static gid_t groups[MAX_GROUPS];
    size_t ngroups = 0;
    if (strcmp(argv[9], "-") != 0) {
        for (char *s = argv[9]; ok && *s;) {
            char *end;
            unsigned long g = strtoul(s, &end, 10);
            if (end == s || (*end != ',' && *end != '\0') || ngroups == MAX_GROUPS)
                ok = 0;
            groups[ngroups++ % MAX_GROUPS] = (gid_t)g;
            s = *end == ',' ? end + 1 : end;
        }
    }
    long nexec = parse_long(argv[10], &ok);
    if (!ok || nexec < 1 || 11 + nexec >= argc || strcmp(argv[11 + nexec], "--") != 0 || 12 + nexec >= argc) {
        send_report(1, 6, EINVAL, 0);
        return 2;
    }
    char **execs = argv + 11;
    char **job_argv = argv + 12 + nexec;
    argv[11 + nexec] = NULL;   /* execs[] ends here */

    /* The report pipe moves off fd 1; fds 1 and 2 of the shim itself go nowhere. */
    int rep = fcntl(1, F_DUPFD_CLOEXEC, 3);
    int devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (rep < 0 || devnull < 0) {
        send_report(1, 6, errno, 0);
        return 2;
    }
    dup2(devnull, 1);
    dup2(devnull, 2);
    close(devnull);

    /* Nothing but SIGKILL ends the shim: the daemon's stop reaches the job's process
     * group, never this one. SIGCHLD comes through a signalfd. */
    sigset_t chld, orig;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, &orig);
    static const int ignored[] = {SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGPIPE,
                                  SIGALRM, SIGTSTP, SIGTTIN, SIGTTOU, SIGXFSZ, SIGVTALRM, SIGPROF};
    for (size_t i = 0; i < sizeof ignored / sizeof ignored[0]; i++)
        signal(ignored[i], SIG_IGN);
    int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    /* Descendants the job orphans (double forks) come to the shim, not to init: the
     * job's whole tree stays under one process the daemon knows. */
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    int out[2], er[2];
    if (sfd < 0 || pipe2(out, O_CLOEXEC) < 0 || pipe2(er, O_CLOEXEC) < 0) {
        send_report(rep, 6, errno, 0);
        return 2;
    }

    pid_t job = vfork();
    if (job == 0) {
        /* The job, until execve: system calls only (vfork shares the shim's memory). */
        int stage = 1;
        for (int s = 1; s < NSIG; s++) {
            if (s != SIGKILL && s != SIGSTOP)
                signal(s, SIG_DFL);   /* SIG_IGN would survive the exec */
        }
        if (dup2(out[1], 1) < 0 || dup2(out[1], 2) < 0)
            goto fail;
        stage = 2;
        if (chdir(cwd) < 0)
            goto fail;
        stage = 3;
        if (setsid() < 0)
            goto fail;
        stage = 4;
        if (uid >= 0 && gid >= 0) {
            if (syscall(SYS_setgroups, ngroups, groups) < 0 || syscall(SYS_setresgid, gid, gid, gid) < 0 ||
                syscall(SYS_setresuid, uid, uid, uid) < 0)
                goto fail;
        }
        stage = 5;
        prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0);
        if (syscall(SYS_close_range, 3U, ~0U, T_CLOSE_RANGE_CLOEXEC) < 0) {
            for (int fd = 3; fd < 65536; fd++) {
                int fl = fcntl(fd, F_GETFD);
                if (fl >= 0 && !(fl & FD_CLOEXEC))
                    fcntl(fd, F_SETFD, fl | FD_CLOEXEC);
            }
        }
        sigprocmask(SIG_SETMASK, &orig, NULL);
        int first = 0;
        for (char **path = execs; *path != NULL; path++) {
            execve(*path, job_argv, environ);
            if (errno != ENOENT && errno != ENOTDIR && first == 0)
                first = errno;
        }
        errno = first ? first : ENOENT;
    fail:;
        int msg[2] = {stage, errno};
        ssize_t w;
        do {
            w = write(er[1], msg, sizeof msg);
        } while (w < 0 && errno == EINTR);
        _exit(127);
    }
    int fork_errno = errno;
    close(out[1]);
    close(er[1]);
    if (job < 0) {
        send_report(rep, 6, fork_errno, 0);
        return 2;
    }
    int msg[2] = {0, 0};
    ssize_t got;
    do {
        got = read(er[0], msg, sizeof msg);
    } while (got < 0 && errno == EINTR);
    close(er[0]);
    if (got == (ssize_t)sizeof msg && msg[0] != 0) {
        int st;
        while (waitpid(job, &st, 0) < 0 && errno == EINTR)
            ;
        send_report(rep, msg[0], msg[1], 0);
        return 1;
    }
    send_report(rep, 0, 0, job);
    close(rep);
    fcntl(out[0], F_SETFL, fcntl(out[0], F_GETFL) | O_NONBLOCK);

    struct pollfd fds[2] = {{.fd = out[0], .events = POLLIN}, {.fd = sfd, .events = POLLIN}};
    int job_status = 0, exited = 0;
    struct timespec exit_at = {0, 0};
    while (!exited) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (fds[0].fd >= 0 && fds[0].revents) {
            ssize_t n = read(out[0], buf, sizeof buf);
            if (n > 0)
                log_write(buf, (size_t)n);
            else if (n == 0 || (errno != EAGAIN && errno != EINTR))
                fds[0].fd = -1;   /* every writer closed its end: nothing more to read */
        }
        if (fds[1].revents) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) > 0)
                ;
            pid_t p;
            int st;
            /* The job and the orphans of its tree: only the job's status is kept. */
            while ((p = waitpid(-1, &st, WNOHANG)) > 0) {
                if (p == job) {
                    clock_gettime(CLOCK_REALTIME, &exit_at);
                    job_status = st;
                    exited = 1;
                }
            }
        }
    }
    for (int i = 0; fds[0].fd >= 0 && i < DRAIN_CHUNKS; i++) {
        ssize_t n = read(out[0], buf, sizeof buf);
        if (n <= 0)
            break;
        log_write(buf, (size_t)n);
    }
    if (!exited)
        return 3;
    return write_status(status_path, job, job_status, &exit_at) == 0 ? 0 : 4;
}
