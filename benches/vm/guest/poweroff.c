/* The floor's /init: powers the VM off at once, so a boot measures only the VMM, the
 * kernel and the power-off path. */
#include <sys/reboot.h>
#include <unistd.h>

int main(void) {
  sync();
  reboot(RB_POWER_OFF);
  return 1;
}
