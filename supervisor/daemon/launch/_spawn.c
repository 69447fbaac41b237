/* clone3(CLONE_INTO_CGROUP | CLONE_PIDFD | CLONE_VFORK) with the child side in C.
 *
 * Why C: the child of a clone is a copy of a multi-threaded daemon with only the calling
 * thread in it. If it ran even one Python bytecode, a GIL drop request that another thread
 * had posted before the clone would make it hand the GIL to a thread that does not exist
 * and wait for it forever (seen under load: the child parked in a futex, the launch lost).
 * Here the child runs only async-signal-safe system calls on memory prepared beforehand by
 * the parent, exactly like CPython's own _posixsubprocess, and the parent is suspended
 * (CLONE_VFORK) only until the child's execve or _exit.
 *
 * On x86_64 the child also shares the parent's memory (CLONE_VM, on a stack of its own,
 * as glibc's posix_spawn does): no copy of the daemon's page tables, which costs about a
 * millisecond a launch. Elsewhere, and with share_memory=0, it is a copy-on-write clone.
 *
 * spawn(execs, argv, envp, cwd, stdin_fd, stdout_fd, cgroup_fd, uid, gid, groups, share_memory)
 *   -> (pid, pidfd, stage, errno)
 * stage 0: started (pid, pidfd valid). Otherwise the child failed at that stage (1 stdio,
 * 2 workdir, 3 setsid, 4 user, 5 exec) with that errno, and has been reaped.
 * OSError when clone3 itself fails. uid/gid -1: no change of user.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#define T_CLONE_VM 0x00000100ULL
#define T_CLONE_VFORK 0x00004000ULL
#define T_CLONE_PIDFD 0x00001000ULL
#define T_CLONE_INTO_CGROUP 0x200000000ULL
#define T_CLOSE_RANGE_CLOEXEC (1U << 2)

struct t_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
        set_tid, set_tid_size, cgroup;
};

static void free_strv(char **v) {
    if (v == NULL)
        return;
    for (char **p = v; *p != NULL; p++)
        PyMem_RawFree(*p);
    PyMem_RawFree(v);
}

/* A NULL-terminated copy of a sequence of bytes, owned by us (the child may not touch
 * Python objects). */
static char **strv_from(PyObject *seq, const char *what) {
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    char **v = PyMem_RawCalloc((size_t)n + 1, sizeof(char *));
    if (v == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        char *s;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(PySequence_Fast_GET_ITEM(fast, i), &s, &len) < 0 ||
            (Py_ssize_t)strlen(s) != len) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "%s: embedded NUL byte", what);
            free_strv(v);
            Py_DECREF(fast);
            return NULL;
        }
        v[i] = PyMem_RawMalloc((size_t)len + 1);
        if (v[i] == NULL) {
            free_strv(v);
            Py_DECREF(fast);
            PyErr_NoMemory();
            return NULL;
        }
        memcpy(v[i], s, (size_t)len + 1);
    }
    Py_DECREF(fast);
    return v;
}

struct plan {
    char **execs, **argv, **envp;
    const char *cwd;
    int stdin_fd, stdout_fd, report_fd;
    long uid, gid;
    gid_t *groups;
    size_t ngroups;
    sigset_t mask;      /* the mask the job starts with: the caller's, before we blocked all */
};

static void report(int fd, int stage, int err) {
    int msg[2] = {stage, err};
    ssize_t r;
    do {
        r = write(fd, msg, sizeof msg);
    } while (r < 0 && errno == EINTR);
}

/* In the clone until execve: system calls only, no allocation, no Python. */
static void child(const struct plan *p) {
    int stage = 1;
    for (int s = 1; s < NSIG; s++) {
        struct sigaction sa;
        if (s == SIGKILL || s == SIGSTOP)
            continue;
        if (sigaction(s, NULL, &sa) == 0 && sa.sa_handler != SIG_DFL) {
            memset(&sa, 0, sizeof sa);
            sa.sa_handler = SIG_DFL;
            sigaction(s, &sa, NULL);
        }
    }
    if (dup2(p->stdin_fd, 0) < 0 || dup2(p->stdout_fd, 1) < 0 || dup2(p->stdout_fd, 2) < 0)
        goto fail;
    stage = 2;
    if (chdir(p->cwd) < 0)
        goto fail;
    stage = 3;
    if (setsid() < 0)
        goto fail;
    stage = 4;
    /* Raw system calls: glibc's set*id would try to signal the parent's other threads. */
    if (p->uid >= 0 && p->gid >= 0) {
        if (syscall(SYS_setgroups, p->ngroups, p->groups) < 0 ||
            syscall(SYS_setresgid, p->gid, p->gid, p->gid) < 0 ||
            syscall(SYS_setresuid, p->uid, p->uid, p->uid) < 0)
            goto fail;
    }
    stage = 5;
    /* Every inherited fd above stderr closes at exec, the report pipe too: its EOF says "started". */
    if (syscall(SYS_close_range, 3U, ~0U, T_CLOSE_RANGE_CLOEXEC) < 0) {
        for (int fd = 3; fd < 65536; fd++) {
            int fl = fcntl(fd, F_GETFD);
            if (fl >= 0 && !(fl & FD_CLOEXEC))
                fcntl(fd, F_SETFD, fl | FD_CLOEXEC);
        }
    }
    sigprocmask(SIG_SETMASK, &p->mask, NULL);
    int first = 0;
    for (char **path = p->execs; *path != NULL; path++) {
        execve(*path, p->argv, p->envp);
        if (errno != ENOENT && errno != ENOTDIR && first == 0)
            first = errno;
    }
    errno = first ? first : ENOENT;
fail:
    report(p->report_fd, stage, errno);
    _exit(127);
}

static void child_entry(void *p) { child((const struct plan *)p); }

#define CHILD_STACK (256 * 1024)

#if defined(__x86_64__)
#define HAVE_CLONE_ON_STACK 1
/* clone3 whose child starts on ca->stack and calls fn(arg) without returning through any
 * frame of the parent's (which it shares): the trampoline glibc's own clone3 uses. */
static long clone3_on_stack(struct t_clone_args *ca, void (*fn)(void *), void *arg) {
    long ret;
    register void (*r12)(void *) __asm__("r12") = fn;
    register void *r13 __asm__("r13") = arg;
    __asm__ volatile(
        "syscall\n\t"
        "test %%rax, %%rax\n\t"
        "jnz 1f\n\t"
        "xor %%ebp, %%ebp\n\t"
        "mov %%r13, %%rdi\n\t"
        "call *%%r12\n\t"
        "mov $60, %%eax\n\t"      /* exit(127): child() never returns; in case */
        "mov $127, %%edi\n\t"
        "syscall\n\t"
        "hlt\n"
        "1:"
        : "=a"(ret)
        : "0"((long)SYS_clone3), "D"(ca), "S"(sizeof *ca), "r"(r12), "r"(r13)
        : "rcx", "r11", "memory", "cc");
    return ret;
}
#else
#define HAVE_CLONE_ON_STACK 0
#endif

static PyObject *t_spawn(PyObject *self, PyObject *args) {
    PyObject *o_execs, *o_argv, *o_envp, *o_groups;
    const char *cwd;
    int stdin_fd, stdout_fd, cgroup_fd;
    long uid, gid;
    int share_memory;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOyiiillOp:spawn", &o_execs, &o_argv, &o_envp, &cwd, &stdin_fd,
                          &stdout_fd, &cgroup_fd, &uid, &gid, &o_groups, &share_memory))
        return NULL;
    void *stack = MAP_FAILED;
    struct plan p;
    memset(&p, 0, sizeof p);
    p.cwd = cwd;
    p.stdin_fd = stdin_fd;
    p.stdout_fd = stdout_fd;
    p.uid = uid;
    p.gid = gid;
    p.report_fd = -1;
    PyObject *result = NULL;
    int pipefd[2] = {-1, -1};
    if ((p.execs = strv_from(o_execs, "execs")) == NULL || (p.argv = strv_from(o_argv, "argv")) == NULL ||
        (p.envp = strv_from(o_envp, "env")) == NULL)
        goto done;
    PyObject *fast = PySequence_Fast(o_groups, "groups");
    if (fast == NULL)
        goto done;
    p.ngroups = (size_t)PySequence_Fast_GET_SIZE(fast);
    p.groups = PyMem_RawCalloc(p.ngroups + 1, sizeof(gid_t));
    for (size_t i = 0; p.groups != NULL && i < p.ngroups; i++)
        p.groups[i] = (gid_t)PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(fast, (Py_ssize_t)i));
    Py_DECREF(fast);
    if (p.groups == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (PyErr_Occurred())
        goto done;
    if (pipe2(pipefd, O_CLOEXEC) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    p.report_fd = pipefd[1];
    share_memory = share_memory && HAVE_CLONE_ON_STACK;
    if (share_memory) {
        stack = mmap(NULL, CHILD_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (stack == MAP_FAILED) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
    }

    int pidfd = -1, saved_errno = 0;
    long pid;
    struct t_clone_args ca;
    memset(&ca, 0, sizeof ca);
    ca.flags = T_CLONE_INTO_CGROUP | T_CLONE_PIDFD | T_CLONE_VFORK;
    ca.pidfd = (uint64_t)(uintptr_t)&pidfd;
    ca.exit_signal = SIGCHLD;
    ca.cgroup = (uint64_t)cgroup_fd;
    if (share_memory) {
        ca.flags |= T_CLONE_VM;
        ca.stack = (uint64_t)(uintptr_t)stack;
        ca.stack_size = CHILD_STACK;
    }
    sigset_t all;
    sigfillset(&all);
    Py_BEGIN_ALLOW_THREADS
    /* Every signal blocked across the clone: no handler of the daemon's may run in the
     * child; it restores this mask just before execve. */
    pthread_sigmask(SIG_SETMASK, &all, &p.mask);
#if HAVE_CLONE_ON_STACK
    if (share_memory)
        pid = clone3_on_stack(&ca, child_entry, &p);     /* the child never comes back here */
    else
#endif
    {
        pid = syscall(SYS_clone3, &ca, sizeof ca);
        if (pid == 0)
            child(&p);      /* never returns */
    }
    saved_errno = pid < 0 ? (int)(share_memory ? -pid : errno) : 0;
    pthread_sigmask(SIG_SETMASK, &p.mask, NULL);
    Py_END_ALLOW_THREADS
    close(pipefd[1]);
    pipefd[1] = -1;
    if (pid < 0) {
        errno = saved_errno;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    /* CLONE_VFORK: the child has exec'd (the pipe is at EOF) or written its report and exited. */
    int msg[2] = {0, 0};
    ssize_t got;
    do {
        got = read(pipefd[0], msg, sizeof msg);
    } while (got < 0 && errno == EINTR);
    if (got == (ssize_t)sizeof msg && msg[0] != 0) {
        int status;
        while (waitpid((pid_t)pid, &status, 0) < 0 && errno == EINTR)
            ;
        close(pidfd);
        result = Py_BuildValue("(iiii)", -1, -1, msg[0], msg[1]);
    } else {
        result = Py_BuildValue("(liii)", pid, pidfd, 0, 0);
    }
done:
    if (stack != MAP_FAILED)
        munmap(stack, CHILD_STACK);
    if (pipefd[0] >= 0)
        close(pipefd[0]);
    if (pipefd[1] >= 0)
        close(pipefd[1]);
    free_strv(p.execs);
    free_strv(p.argv);
    free_strv(p.envp);
    PyMem_RawFree(p.groups);
    return result;
}

static PyMethodDef methods[] = {
    {"spawn", t_spawn, METH_VARARGS, "clone3 into a cgroup and execve; see the module source."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_spawn", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__spawn(void) { return PyModule_Create(&module); }
