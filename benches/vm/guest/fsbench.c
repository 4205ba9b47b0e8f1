/* Guest side of the virtio-fs benchmark, timed with CLOCK_MONOTONIC so that no shell or
 * formatting work (slow under TCG) dilutes the file system's own cost.
 *   fsbench read TAG ROUND FILE   sequential read in 1 MiB requests
 *   fsbench stat TAG ROUND DIR    readdir, then fstatat() every entry
 * Each prints "@@<op> TAG ROUND <nanoseconds> <bytes or entries>". */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int do_read(const char *path, long long *count) {
  static char buf[1 << 20];
  int fd = open(path, O_RDONLY);
  if (fd < 0) return -1;
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) return -1;
    if (n == 0) break;
    *count += n;
  }
  return close(fd);
}

static int do_stat(const char *path, long long *count) {
  DIR *d = opendir(path);
  if (!d) return -1;
  size_t cap = 1024, len = 0;
  char **names = malloc(cap * sizeof *names);
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.') continue;
    if (len == cap) names = realloc(names, (cap *= 2) * sizeof *names);
    names[len++] = strdup(e->d_name);
  }
  int dfd = dirfd(d);
  for (size_t i = 0; i < len; i++) {
    struct stat st;
    if (fstatat(dfd, names[i], &st, AT_SYMLINK_NOFOLLOW) != 0) return -1;
    *count += 1;
  }
  return closedir(d);
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: fsbench read|stat TAG ROUND PATH\n");
    return 2;
  }
  long long count = 0, t0 = now_ns();
  int rc = strcmp(argv[1], "read") == 0   ? do_read(argv[4], &count)
           : strcmp(argv[1], "stat") == 0 ? do_stat(argv[4], &count)
                                          : -2;
  long long t1 = now_ns();
  if (rc != 0) {
    printf("@@error %s %s %s\n", argv[1], argv[2], argv[4]);
    perror("fsbench");
    return 1;
  }
  printf("@@%s %s %s %lld %lld\n", argv[1], argv[2], argv[3], t1 - t0, count);
  return 0;
}
