"""--time-limit: a run that fits a number of minutes by training fewer steps, its schedule intact.

Used by gpt_train.py. The same settings run at 8,000 tokens/s on one CPU and at a third of that on
another (one without bf16 instructions), so a fixed number of steps cannot promise a duration. Stopping
at the limit would cut the schedule short before its decay, where the loss falls most; instead, once
warmup has been timed, the run projects what every remaining step and evaluation will take at the
measured pace and lowers --max-steps to the most that fit. The warmup's learning rates do not depend
on --max-steps, so the run is the one that a plain --max-steps of that number gives. With the wsd
schedule the plan is made again at every evaluation before the decay begins, when the rate is
still the constant peak whatever the count: a machine that slows down mid-run is caught in time, and
one whose first steps ran slow (a busy hour, memory not yet reused) gets its steps back, up to
--max-steps and never past it.
"""

import time
from statistics import median

from loguru import logger

TIMED_STEPS = 10  # steps timed before the first plan, at least: the first few run slower
SPARE = 0.02  # of the limit, left over: Python's start-up before main, a pace that wobbles near the end


def steps_that_fit(seconds_left, *, step, max_steps, step_seconds, eval_seconds, final_eval_seconds, eval_interval):
    """The largest n <= max_steps, and at least step + 1, such that training steps step .. n - 1, the
    periodic evaluations at multiples of eval_interval from step on, the last evaluation at n and
    the final one over the whole validation split take at most seconds_left at the pace given."""
    for n in range(max_steps, step + 1, -1):
        evaluations = n // eval_interval - (step - 1) // eval_interval  # multiples of eval_interval in [step, n]
        evaluations += n % eval_interval != 0  # the last step always evaluates
        if (n - step) * step_seconds + evaluations * eval_seconds + final_eval_seconds <= seconds_left:
            return n
    return step + 1


class TimeBudget:
    """The minutes a run may take (0: no limit), counted from its construction, which gpt_train.py's
    main does first, before the model is built; max_steps: --max-steps as asked, the most any plan gives."""

    def __init__(self, minutes, max_steps):
        self.seconds, self.max_steps = minutes * 60, max_steps
        self.started = time.perf_counter()
        self.eval_seconds = []  # each periodic evaluation, its text sample and plots included

    def evaluated(self, seconds):
        self.eval_seconds.append(seconds)

    def due(self, step, config, start_step):
        """Whether to plan at this step: at the end of warmup, then (wsd) at every evaluation until the
        decay begins, in a run that has timed an evaluation and began before warmup ended. A run
        resumed later keeps the steps that its checkpoint recorded."""
        first_plan = max(config.warmup_steps, TIMED_STEPS)
        if not self.seconds or start_step >= first_plan or step < first_plan or not self.eval_seconds:
            return False
        decay_start = config.max_steps - round(config.cooldown_frac * config.max_steps)
        at_evaluation = config.schedule == "wsd" and step % config.eval_interval == 0 and step < decay_start
        return step == first_plan or at_evaluation

    def plan(self, step, config, step_times, final_eval_share, run):
        """The run's new --max-steps (config.max_steps holds the current plan): the most that fit what is
        left of the limit, at the median pace of the newest steps and of the evaluations so far, in the
        slowest process (all must agree), never more than --max-steps as asked.
        `final_eval_share`: the final evaluation's batches over a periodic one's."""
        seconds_left = (1 - SPARE) * self.seconds - (time.perf_counter() - self.started)
        step_seconds, eval_seconds = median(step_times[-50:]), median(self.eval_seconds)
        steps = steps_that_fit(seconds_left, step=step, max_steps=self.max_steps, step_seconds=step_seconds,
                               eval_seconds=eval_seconds, final_eval_seconds=eval_seconds * final_eval_share,
                               eval_interval=config.eval_interval)
        steps = -run.max_over_processes(-steps)
        if steps != config.max_steps:
            change = f"not {config.max_steps}" if steps < config.max_steps else f"up from {config.max_steps}"
            logger.info(f"--time-limit {config.time_limit:g} min: {steps} steps fit, {change} "
                        f"({step_seconds * 1000:.0f} ms a step, {eval_seconds:.1f} s an evaluation, "
                        f"{seconds_left / 60:.1f} min left)")
        return steps
