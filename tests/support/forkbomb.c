/* A fork bomb for the hostile-build VM tests (busybox's shell forks too slowly under TCG to
 * reach the limit in a few seconds): forks children that each fork again, until fork fails,
 * then reports how many processes run and why fork failed, and exits 0 while the rest
 * of the bomb is still running. The guest agent must kill the rest. */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(void) {
  int pipefd[2];
  if (pipe(pipefd) != 0) {
    perror("forkbomb: pipe");
    return 2;
  }
  for (;;) {
    pid_t pid = fork();
    if (pid < 0) {
      int e = errno;
      /* hidepid=2: /proc shows exactly the build user's processes. */
      int seen = 0;
      DIR *proc = opendir("/proc");
      struct dirent *d;
      while (proc && (d = readdir(proc)) != NULL) {
        if (d->d_name[0] >= '0' && d->d_name[0] <= '9') seen++;
      }
      printf("forkbomb: fork failed with %d processes running: %s\n", seen, strerror(e));
      fflush(stdout);
      return 0;
    }
    if (pid == 0) {
      /* The child keeps forking too (without reporting): an exponential bomb. */
      close(pipefd[0]);
      for (;;) {
        if (fork() < 0) pause();
      }
    }
  }
}
