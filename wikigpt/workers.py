"""Work spread over processes, results in order: how gpt_dataset.py cleans and tokenises in parallel.

Used by gpt_dataset.py (tokenizer_texts, write_shards). A source of Wikipedia can be larger than
memory, so the tasks are read lazily and only a bounded number of them is in flight at once: the
workers run ahead of the consumer by a few tasks, never by the whole source.
"""

import collections
import multiprocessing
import sys


def ordered_results(work, tasks, workers, args=(), initializer=None, initargs=()):
    """(work(task, *args), where) for each (task, where) of `tasks`, in their order, computed by
    `workers` processes that each run initializer(*initargs) when they start (in this process for one
    worker). At most 4 tasks per worker are in flight, so memory stays flat however long `tasks` is."""
    if workers == 1:
        if initializer:
            initializer(*initargs)
        yield from ((work(task, *args), where) for task, where in tasks)
        return
    in_flight = collections.deque()
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        try:
            for task, where in tasks:
                in_flight.append((pool.apply_async(work, (task, *args)), where))
                if len(in_flight) >= 4 * workers:
                    result, where = in_flight.popleft()
                    yield result.get(), where
            while in_flight:
                result, where = in_flight.popleft()
                yield result.get(), where
        except GeneratorExit:
            # The caller stopped early (gpt_dataset.py's --max-tokens reached). Leaving the block
            # terminates the pool, which can wait for ever on its feeder thread if that is still
            # writing a task to a worker: let the few tasks in flight finish first, so that it has
            # nothing left to write.
            for result, _ in in_flight:
                result.wait()
            raise
