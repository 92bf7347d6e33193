/*
 * fork_configure.c - fork while another thread is inside ap_configure().
 *
 * One thread configures a large policy over and over, so that it is almost
 * always inside ap_configure(); the main thread forks children meanwhile.
 * Each child configures a policy of its own and enters its scope. A child
 * that inherited the configure in progress would wait for ever for a thread
 * it does not have: an alarm turns that into SIGALRM, which the parent
 * reports. Prints "N children configured" when every child succeeded.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "allocpolicy.h"

#define CHILDREN 40

static ap_status (*configure)(const char *, size_t *);
static ap_status (*scope_find)(const char *, uint32_t *);
static ap_status (*enter)(uint32_t, uint32_t *);
static ap_status (*leave)(void);
static atomic_int stop;
static char big[64 * 1024];

static void *configure_forever(void *arg) {
    (void)arg;
    while (!atomic_load(&stop))
        if (configure(big, NULL) != AP_OK) {
            fputs("configuring the large policy failed\n", stderr);
            _exit(2);
        }
    return NULL;
}

static int child(void) {
    alarm(30); /* a deadlock must end the child, not the test run */
    if (configure("v=1;process=raise:0;scope=child:raise:1048576:0", NULL) != AP_OK)
        return 3;
    uint32_t sid, inst;
    if (scope_find("child", &sid) != AP_OK || enter(sid, &inst) != AP_OK || leave() != AP_OK)
        return 4;
    return 0;
}

int main(void) {
    *(void **)&configure = dlsym(RTLD_DEFAULT, "ap_configure");
    *(void **)&scope_find = dlsym(RTLD_DEFAULT, "ap_scope_find");
    *(void **)&enter = dlsym(RTLD_DEFAULT, "ap_enter");
    *(void **)&leave = dlsym(RTLD_DEFAULT, "ap_exit");
    if (!configure || !scope_find || !enter || !leave) {
        fputs("the runtime is not preloaded\n", stderr);
        return 2;
    }
    size_t len = (size_t)snprintf(big, sizeof big, "v=1;process=raise:0");
    for (int i = 0; i < 200; i++)
        len += (size_t)snprintf(big + len, sizeof big - len, ";scope=scope_%d:raise:%d:0", i, (i + 1) << 20);
    pthread_t t;
    pthread_create(&t, NULL, configure_forever, NULL);
    int failed = 0;
    for (int i = 0; i < CHILDREN; i++) {
        pid_t pid = fork();
        if (pid == 0)
            _exit(child());
        int status;
        waitpid(pid, &status, 0);
        if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM) {
            printf("child %d deadlocked in ap_configure\n", i);
            failed = 1;
            break;
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            printf("child %d failed (status %#x)\n", i, status);
            failed = 1;
            break;
        }
    }
    atomic_store(&stop, 1);
    pthread_join(t, NULL);
    if (!failed)
        printf("%d children configured\n", CHILDREN);
    return failed;
}
