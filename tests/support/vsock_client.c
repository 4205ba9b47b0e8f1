/* A guest-side vsock client for VM tests (busybox has none): connects to the host (CID 2)
 * on the port given as argv[1], sends argv[2] and a newline, and prints the reply. */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: vsock-client PORT MESSAGE\n");
    return 2;
  }
  int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
  if (fd < 0) {
    perror("vsock-client: socket");
    return 1;
  }
  struct sockaddr_vm addr;
  memset(&addr, 0, sizeof addr);
  addr.svm_family = AF_VSOCK;
  addr.svm_cid = VMADDR_CID_HOST;
  addr.svm_port = (unsigned)atoi(argv[1]);
  if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
    perror("vsock-client: connect");
    return 1;
  }
  size_t len = strlen(argv[2]);
  if (write(fd, argv[2], len) != (ssize_t)len || write(fd, "\n", 1) != 1) {
    perror("vsock-client: write");
    return 1;
  }
  char buf[256];
  ssize_t n = read(fd, buf, sizeof buf - 1);
  if (n < 0) {
    perror("vsock-client: read");
    return 1;
  }
  buf[n] = 0;
  printf("vsock-client: reply: %s\n", buf);
  return 0;
}
