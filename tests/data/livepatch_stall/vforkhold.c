/* Holds a vfork() parent asleep in wait_for_completion_killable(): the child sleeps without exec. */
#include <unistd.h>

int main(void)
{
	if (vfork() == 0) {
		for (;;)
			pause();
	}
	return 0;
}
