// SPDX-License-Identifier: GPL-2.0
/*
 * A livepatch whose transition stalls on purpose (kpipe's lab tests):
 * it replaces wait_for_completion_state() (kernel/sched/completion.c, 6.1+),
 * in which a vfork() parent sleeps TASK_KILLABLE|TASK_FREEZABLE until its
 * child execs or exits (kernel/fork.c, wait_for_vfork_done). The fake signal
 * of "signaling remaining tasks" does not wake a killable sleeper, so the
 * transition completes only once the child is gone.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/completion.h>
#include <linux/sched.h>

static int livepatch_wait_for_completion_state(struct completion *x, unsigned int state)
{
	long t;

	/* the same waits through exported helpers (freezer bit aside: no freezing in the lab) */
	if (state & TASK_INTERRUPTIBLE)
		t = wait_for_completion_interruptible_timeout(x, MAX_SCHEDULE_TIMEOUT);
	else if (state & TASK_WAKEKILL)
		t = wait_for_completion_killable_timeout(x, MAX_SCHEDULE_TIMEOUT);
	else
		t = wait_for_completion_timeout(x, MAX_SCHEDULE_TIMEOUT);
	return t < 0 ? (int)t : 0;
}

static struct klp_func funcs[] = {
	{
		.old_name = "wait_for_completion_state",
		.new_func = livepatch_wait_for_completion_state,
	}, { }
};

static struct klp_object objs[] = {
	{
		.funcs = funcs,
	}, { }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
};

static int livepatch_init(void)
{
	return klp_enable_patch(&patch);
}

static void livepatch_exit(void)
{
}

module_init(livepatch_init);
module_exit(livepatch_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
