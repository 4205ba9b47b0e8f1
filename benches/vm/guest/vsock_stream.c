/* The raw-vsock peer of the output harvest: connects to the host (CID 2) on PORT and
 * writes MIB mebibytes from memory in 256 KiB writes (the agent's file chunk size), then
 * waits for the host to close (the host stops at the byte count: vhost-device-vsock does not
 * pass a half-close on as EOF). Prints "@@stream-sent <bytes>" on success. */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHUNK (256 * 1024)

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: vsock-stream PORT MIB\n");
    return 2;
  }
  int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
  if (fd < 0) {
    perror("vsock-stream: socket");
    return 1;
  }
  struct sockaddr_vm addr;
  memset(&addr, 0, sizeof addr);
  addr.svm_family = AF_VSOCK;
  addr.svm_cid = VMADDR_CID_HOST;
  addr.svm_port = (unsigned)atoi(argv[1]);
  if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
    perror("vsock-stream: connect");
    return 1;
  }
  static char buf[CHUNK];
  for (size_t i = 0; i < sizeof buf; i++) buf[i] = (char)(i * 2654435761u >> 13);
  long long total = (long long)atoi(argv[2]) * 1024 * 1024, sent = 0;
  while (sent < total) {
    size_t want = total - sent < CHUNK ? (size_t)(total - sent) : CHUNK;
    ssize_t n = write(fd, buf, want);
    if (n <= 0) {
      perror("vsock-stream: write");
      return 1;
    }
    sent += n;
  }
  char c;
  while (read(fd, &c, 1) > 0) {
  }
  close(fd);
  printf("@@stream-sent %lld\n", sent);
  return 0;
}
